"""The data loops of the online side (DESIGN §6): scored samples -> pairs, KTO or SFT data and
arena battles (`pairs`), and rounds of sample -> score -> pair -> train (`iterate`, which calls
`prefopt.training.run.train`)."""
