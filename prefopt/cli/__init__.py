"""The `prefopt` command line (`prefopt.cli.main:main`): parse, call the library, print.

`main` holds the parser and the train / losses / data commands, `online` the rewards, sample,
pairs and iterate commands, `eval` the eval and report commands, `_options` the flags they share.
Each command imports the library inside its function, so `prefopt --help` loads no torch."""
