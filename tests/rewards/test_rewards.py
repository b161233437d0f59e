"""The reward registry: built-in rewards by hand-computed values, user rewards, bad rewards."""

import textwrap

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import byte_tokenizer, save_tiny_model, tiny_llama

from prefopt.rewards import RewardError, available_rewards, get_reward, import_reward_module


def test_builtins_are_registered():
    assert {"exact_match", "number_match", "reward_model", "implicit", "judge"} <= set(available_rewards())


def test_exact_match_and_number_match_by_hand():
    exact = get_reward("exact_match")
    completions = [" 8", "8.", "It is 8.", "Paris", "9", "x"]
    answers = ["8", "8", "8", "paris", "8", None]
    assert exact(["q"] * 6, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0, None]
    number = get_reward("number_match")
    completions = ["3 + 5 = 8.", "It is 8.0", "eighteen 18", "no", "7"]
    assert number(["q"] * 5, completions, answer=["8", "8", "8", "8", None]) == [1.0, 1.0, 0.0, 0.0, None]


def test_a_reward_needs_its_column():
    with pytest.raises(RewardError, match="needs the column 'answer' in the prompts file; found: topic"):
        get_reward("exact_match")(["q"], ["a"], topic=["x"])


def test_user_reward_module_with_arguments(tmp_path):
    module = tmp_path / "my_rewards.py"
    module.write_text(
        textwrap.dedent(
            """
            from prefopt.rewards import register_reward

            @register_reward("test_length")
            def length(prompts, completions, *, scale=1.0, **columns):
                return [scale * len(c) for c in completions]

            @register_reward("test_wrong_count")
            def wrong_count(prompts, completions, **columns):
                return [1.0]

            @register_reward("test_not_a_number")
            def not_a_number(prompts, completions, **columns):
                return ["good" for _ in completions]

            @register_reward("test_nan_is_unscorable")
            def nan(prompts, completions, **columns):
                return [float("nan"), True, float("inf"), -float("inf")]
            """
        )
    )
    import_reward_module(str(module))
    assert get_reward("test_length", scale=0.5)(["p", "q"], ["abc", "de"], scale=["ignored", "too"]) == [1.5, 1.0]
    with pytest.raises(RewardError, match="reward 'test_wrong_count' returned 1 scores for 2 completions"):
        get_reward("test_wrong_count")(["p", "q"], ["a", "b"])
    with pytest.raises(RewardError, match="reward 'test_not_a_number': score 0 is not a number: 'good'"):
        get_reward("test_not_a_number")(["p"], ["a"])
    assert get_reward("test_nan_is_unscorable")(["p"] * 4, ["a", "b", "c", "d"]) == [None, 1.0, None, None]
    with pytest.raises(RewardError, match="has no argument 'scal'"):
        get_reward("test_length", scal=2)
    with pytest.raises(Exception, match="--reward-module: file not found"):
        import_reward_module(str(tmp_path / "missing.py"))


# -- reward_model --------------------------------------------------------------------------------


def _save_reward_model(folder, seed=0):
    from transformers import LlamaForSequenceClassification

    config = tiny_llama(seed).config
    config.num_labels = 1
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def test_reward_model_pools_at_the_closing_eos_even_when_pad_is_eos(tmp_path):
    from transformers import LlamaForSequenceClassification

    path = _save_reward_model(tmp_path / "rm")
    reward = get_reward("reward_model", path=path, batch_size=3)
    prompts = ["Q: 2+2?", "Say hi.", "Be kind."]
    completions = [" 4", " Hello there, friend!", " ok"]
    scores = reward(prompts, completions)

    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    tok = byte_tokenizer()
    assert model.config.pad_token_id == tok.eos_token_id == tok.pad_token_id  # the trap's setting
    expected, stock = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = torch.tensor([tok(prompt + completion)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state
            expected.append(model.score(hidden[0, -1]).item())  # by hand: the head at the EOS position
            stock.append(model(input_ids=ids).logits.item())  # transformers: last token that is not pad
    assert scores == pytest.approx(expected, abs=1e-5)
    # transformers' own pooling skips the EOS (== pad) and scores the token before it
    assert all(abs(s - e) > 1e-4 for s, e in zip(stock, expected, strict=True))
    # batching and padding do not change a score
    assert reward(prompts[1:2], completions[1:2]) == pytest.approx(scores[1:2], abs=1e-5)


def test_reward_model_with_chat_prompts_uses_its_chat_template(tmp_path):
    from transformers import LlamaForSequenceClassification

    path = _save_reward_model(tmp_path / "rm")
    prompt = [{"role": "user", "content": "What is 1 + 2?"}]
    score = get_reward("reward_model", path=path)([prompt], ["3"])[0]
    tok = byte_tokenizer()
    text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "3"}], tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        assert score == pytest.approx(model.score(model.model(input_ids=ids).last_hidden_state[0, -1]).item(), abs=1e-5)


def test_reward_model_rejects_a_causal_lm(tmp_path):
    path = save_tiny_model(tmp_path / "lm")
    with pytest.raises(RewardError, match=r"is not a sequence classifier \(architectures: LlamaForCausalLM\)"):
        get_reward("reward_model", path=path)
    with pytest.raises(RewardError, match="reward 'reward_model' needs path: pass --reward-arg path=..."):
        get_reward("reward_model")


# -- implicit ------------------------------------------------------------------------------------


def _completion_logp(model, prompt: str, completion: str) -> float:
    """Summed log-prob of completion + EOS after a text prompt, from the full logits."""
    tok = byte_tokenizer()
    prompt_ids = tok(prompt)["input_ids"]
    completion_ids = tok(prompt + completion)["input_ids"][len(prompt_ids) :] + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    picked = logprobs[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :]
    return picked.sum().item()


def _fake_run(folder, base, loss_args):
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": base, "loss": "dpo", "loss_args": loss_args}))
    return folder


def test_implicit_reward_of_a_full_run_by_hand(tmp_path):
    base = save_tiny_model(tmp_path / "base", seed=0)
    run = _fake_run(tmp_path / "run", base, {"beta": 0.5})
    save_tiny_model(run / "final", seed=1)
    prompts, completions = ["Q: 2+2?", "Say hi."], [" 4", " Hello!"]
    scores = get_reward("implicit", run=str(run))(prompts, completions)
    policy, reference = tiny_llama(1), tiny_llama(0)
    expected = [
        0.5 * (_completion_logp(policy, p, c) - _completion_logp(reference, p, c))
        for p, c in zip(prompts, completions, strict=True)
    ]
    assert scores == pytest.approx(expected, abs=1e-4)
    # the loss's default beta (dpo: 0.1) when the run set none; final/ works as the run's name too
    default = get_reward("implicit", run=str(run / "final"))
    run_b = _fake_run(tmp_path / "run_b", base, {})
    save_tiny_model(run_b / "final", seed=1)
    assert get_reward("implicit", run=str(run_b))(prompts, completions) == pytest.approx(
        [0.2 * s for s in default(prompts, completions)], abs=1e-4
    )


def test_implicit_reward_of_a_lora_run_disables_the_adapter_for_the_reference(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = save_tiny_model(tmp_path / "base", seed=0)
    run = _fake_run(tmp_path / "run", base, {"beta": 0.1})
    torch.manual_seed(3)
    peft_model = get_peft_model(
        tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(run / "final")
    byte_tokenizer().save_pretrained(run / "final")
    merged = peft_model.merge_and_unload().eval()
    scores = get_reward("implicit", run=str(run))(["Q: 2+2?"], [" 4"])
    expected = 0.1 * (_completion_logp(merged, "Q: 2+2?", " 4") - _completion_logp(tiny_llama(0), "Q: 2+2?", " 4"))
    assert expected != 0 and scores == pytest.approx([expected], abs=1e-4)


def test_implicit_reward_of_a_lora_run_with_a_reference_model_uses_that_reference(tmp_path):
    """An iterative LoRA round: trained from base (seed 0) against --reference-model pi_0 (seed 2).
    Its reward is beta (log pi_t - log pi_0), not against the adapter-off base: with the adapter's
    B = 0 (pi_t = base) the old reading gave 0 for every completion."""
    from peft import LoraConfig, get_peft_model

    base = save_tiny_model(tmp_path / "base", seed=0)
    pi_0 = save_tiny_model(tmp_path / "pi0", seed=2)
    run = tmp_path / "run"
    run.mkdir()
    settings = {"model": base, "reference_model": pi_0, "loss": "dpo", "loss_args": {"beta": 0.1}}
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(run / "final")
    byte_tokenizer().save_pretrained(run / "final")
    scores = get_reward("implicit", run=str(run))(["Q: 2+2?"], [" 4"])
    expected = 0.1 * (
        _completion_logp(tiny_llama(0), "Q: 2+2?", " 4") - _completion_logp(tiny_llama(2), "Q: 2+2?", " 4")
    )
    assert abs(expected) > 1e-3 and scores == pytest.approx([expected], abs=1e-4)


def test_implicit_reward_cuts_long_prompts_as_training_did(tmp_path):
    """max_length 32, max_prompt_length 8: a 40-byte prompt keeps its last 8 tokens, as training
    tokenized it, instead of being dropped as unscorable (None)."""
    base = save_tiny_model(tmp_path / "base", seed=0)
    run = tmp_path / "run"
    run.mkdir()
    settings = {"model": base, "loss": "dpo", "loss_args": {"beta": 1.0}, "max_length": 32, "max_prompt_length": 8}
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    save_tiny_model(run / "final", seed=1)
    prompt = "A long question that runs past 32 bytes?"
    (score,) = get_reward("implicit", run=str(run))([prompt], [" yes"])
    expected = _completion_logp(tiny_llama(1), prompt[-8:], " yes") - _completion_logp(
        tiny_llama(0), prompt[-8:], " yes"
    )
    assert score is not None and score == pytest.approx(expected, abs=1e-4)


def test_implicit_needs_a_finished_run(tmp_path):
    with pytest.raises(RewardError, match="is not a finished prefopt run"):
        get_reward("implicit", run=str(tmp_path))


# -- judge ---------------------------------------------------------------------------------------


def test_judge_averages_both_orders_by_hand(tmp_path):
    path = save_tiny_model(tmp_path / "judge", seed=2)
    judge = get_reward("judge", model=path, batch_size=2)
    prompts, mine, refs = ["What is 2 + 2?", "Capital of France?"], ["4", "Lyon"], ["four", "Paris"]
    scores = judge(prompts, mine, answer=refs)

    from prefopt.rewards.judge import QUESTION

    model, tok = tiny_llama(2), byte_tokenizer()
    a_id, b_id = tok("A", add_special_tokens=False)["input_ids"][0], tok("B", add_special_tokens=False)["input_ids"][0]

    def p_first(prompt, x, y):
        text = tok.apply_chat_template(
            [{"role": "user", "content": QUESTION.format(prompt=prompt, a=x, b=y)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, -1]
        pa, pb = logits[a_id].exp().item(), logits[b_id].exp().item()
        return pa / (pa + pb)

    expected = [(p_first(p, x, y) + 1 - p_first(p, y, x)) / 2 for p, x, y in zip(prompts, mine, refs, strict=True)]
    assert scores == pytest.approx(expected, abs=1e-5)
    # both orders: a vs b and b vs a sum to one, whatever the judge's position bias
    flipped = judge.compare(prompts, refs, mine)
    assert [s + f for s, f in zip(scores, flipped, strict=True)] == pytest.approx([1.0, 1.0], abs=1e-6)
    with pytest.raises(RewardError, match="judge compares with the column 'answer'"):
        judge(prompts, mine)


def test_judge_reads_the_letter_token_that_follows_its_question(smollm2_tokenizer):
    """With a chat template the answer opens the assistant turn: "A". Without one the question
    ends with "Answer:", after which SmolLM2's BPE writes " A", one token of its own."""
    import copy

    from prefopt.rewards.judge import letter_ids

    tok = smollm2_tokenizer
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    spaced = [tok(" A", add_special_tokens=False)["input_ids"], tok(" B", add_special_tokens=False)["input_ids"]]
    assert all(len(ids) == 1 for ids in spaced)
    assert letter_ids(plain) == [ids[0] for ids in spaced]
    assert letter_ids(tok) == [
        tok("A", add_special_tokens=False)["input_ids"][0],
        tok("B", add_special_tokens=False)["input_ids"][0],
    ]
    assert letter_ids(tok) != letter_ids(plain)
    # the byte tokenizer has no " A" token: it keeps "A"
    assert letter_ids(byte_tokenizer()) == [byte_tokenizer()("A", add_special_tokens=False)["input_ids"][0],
                                            byte_tokenizer()("B", add_special_tokens=False)["input_ids"][0]]  # fmt: skip


def test_cli_rewards_lists_builtins_and_user_rewards(tmp_path, capsys):
    from prefopt.cli.main import main

    module = tmp_path / "cli_rewards.py"
    module.write_text(
        "from prefopt.rewards import register_reward\n\n"
        "@register_reward('test_cli_shout', description='exclamation marks')\n"
        "def shout(prompts, completions, **columns):\n"
        "    return [float(c.count('!')) for c in completions]\n"
    )
    assert main(["rewards", "--reward-module", str(module)]) == 0
    out = capsys.readouterr().out
    assert (
        "reward_model\n" in out
        and "arguments: path, batch_size=8" in out
        and "test_cli_shout\n  exclamation marks" in out
    )
    assert main(["rewards", "--reward-module", str(tmp_path / "missing.py")]) == 2
    assert "prefopt: error: --reward-module: file not found" in capsys.readouterr().err
