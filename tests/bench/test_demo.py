"""`make demo`'s pieces (the demo itself trains SmolLM2 for minutes; it is not run here)."""

import json

from prefopt.bench.demo import HELD_OUT, STYLE, house_style, print_table, write_data


def test_demo_pairs_differ_only_in_style_and_the_rule_reward_sees_it(tmp_path):
    train, held_out = write_data(tmp_path)
    rows = [json.loads(line) for line in train.open()]
    held = [json.loads(line) for line in held_out.open()]
    assert len(held) == HELD_OUT and len(rows) + HELD_OUT == 40
    assert not {json.dumps(r["prompt"]) for r in rows} & {json.dumps(r["prompt"]) for r in held}
    for row in rows + held:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen == f"{STYLE} {rejected}"
    assert house_style(["q"] * 3, [" Answer: 42.", "42.", "The Answer: 42"]) == [1.0, 0.0, 0.0]


def test_demo_table_shows_before_and_after(capsys):
    result = {
        "pairs": 8, "reference_prefers_chosen": 0.0, "policy_prefers_chosen": 0.875, "reference_logp_margin": -0.2,
        "logp_margin": 0.1, "loss": 0.33, "kl": 1.2,
        "generation": {"prompts": 8, "reward_reference": 0.0, "reward_policy": 0.75, "win_rate": 0.875,
                       "win_rate_ci95": [0.5293, 0.9776], "sign_test_p": 0.0156,
                       "example": {"prompt": [{"role": "user", "content": "Capital of Peru?"}],
                                   "reference": "Lima.", "policy": "Answer: Lima.", "policy_won": True}},
    }  # fmt: skip
    print_table(result)
    out = capsys.readouterr().out
    assert (
        "held-out question (the first one the trained policy won): Capital of Peru?" in out and "'Answer: Lima.'" in out
    )
    assert "0/8      6/8" in out and "0.000    0.875" in out
    assert "95% interval over the 8 questions (Wilson): 0.53-0.98; sign test p = 0.0156" in out
