"""`prefopt sample`: shared-prefill sampling equals plain generation; prefill once; seeds; adapters; CLI."""

import inspect
import json

import torch
from helpers import byte_tokenizer, save_tiny_model, tiny_llama

from prefopt.cli.main import main
from prefopt.data.formats import load_prompts
from prefopt.models.rollout import SampleSettings, SampleStats, generation_config, left_pad, sample_prompts

PROMPTS = ["Q: what is 2+2?", "Say hi.", "Capital of France? Answer in one word please.", "Be kind."]


def _plain_generate(model, tok, prompt: str, n: int, **settings):
    """Reference: transformers' own generate, one prompt at a time, no padding."""
    config = generation_config(model, tok, SampleSettings(num_samples=n, **settings))
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, num_return_sequences=n
    )
    return out[:, ids.shape[1] :].tolist()


def _trim(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_greedy_shared_prefill_equals_generate_token_for_token():
    model, tok = tiny_llama(0), byte_tokenizer()
    samples = sample_prompts(
        model, tok, PROMPTS, SampleSettings(num_samples=3, max_new_tokens=12, temperature=0, batch_size=4)
    )
    for prompt, group in zip(PROMPTS, samples, strict=True):
        expected = _trim(_plain_generate(model, tok, prompt, 1, max_new_tokens=12, temperature=0)[0], tok.eos_token_id)
        assert group.completion_ids == [expected] * 3  # greedy: the N samples are one
        assert group.prompt_ids == tok(prompt)["input_ids"]


def test_prompt_is_prefilled_once_per_prompt_not_once_per_sample():
    model, tok = tiny_llama(0), byte_tokenizer()
    calls = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    width = max(len(tok(p)["input_ids"]) for p in PROMPTS)
    settings = dict(num_samples=5, max_new_tokens=4, batch_size=4)
    stats = SampleStats()
    sample_prompts(model, tok, PROMPTS, SampleSettings(**settings), stats)
    # one forward over the 4 prompts (all but their last token), then one token per row and step
    assert calls[0] == (4, width - 1) and calls[1] == (20, 1) and all(shape[1] == 1 for shape in calls[1:])
    assert stats.prefill_tokens == sum(len(tok(p)["input_ids"]) for p in PROMPTS)
    calls.clear()
    plain = SampleStats()
    sample_prompts(model, tok, PROMPTS, SampleSettings(**settings, shared_prefill=False), plain)
    assert calls[0] == (20, width)  # as generate(num_return_sequences=5): 5 copies prefilled
    assert plain.prefill_tokens == 5 * stats.prefill_tokens


def test_sampling_equals_plain_sampling_with_the_same_seed_and_is_reproducible():
    model, tok = tiny_llama(1), byte_tokenizer()
    settings = dict(num_samples=4, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, batch_size=2)
    shared = sample_prompts(model, tok, PROMPTS, SampleSettings(**settings))
    plain = sample_prompts(model, tok, PROMPTS, SampleSettings(**settings, shared_prefill=False))
    # same RNG stream, same per-step distributions: the very same draws (not only the same distribution)
    assert [g.completion_ids for g in shared] == [g.completion_ids for g in plain]
    assert [g.completion_ids for g in sample_prompts(model, tok, PROMPTS, SampleSettings(**settings))] == [
        g.completion_ids for g in shared
    ]
    other = sample_prompts(model, tok, PROMPTS, SampleSettings(**{**settings, "seed": 8}))
    assert [g.completion_ids for g in other] != [g.completion_ids for g in shared]
    assert len({tuple(ids) for g in shared for ids in g.completion_ids}) > len(PROMPTS)  # samples differ


def test_finished_flags_ids_and_text():
    model, tok = tiny_llama(0), byte_tokenizer()
    samples = sample_prompts(model, tok, PROMPTS * 3, SampleSettings(num_samples=4, max_new_tokens=30, seed=3))
    flags = [f for g in samples for f in g.finished]
    assert any(flags) and not all(flags)  # the tiny model ends some completions with EOS within 30 tokens
    for group in samples:
        for ids, done, text in zip(group.completion_ids, group.finished, group.completions, strict=True):
            assert done == (ids[-1] == tok.eos_token_id) and tok.eos_token_id not in ids[:-1]
            assert len(ids) == 30 or done
            assert text == tok.decode(ids[:-1] if done else ids)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_model_may_be_a_lora_adapter_final(tmp_path):
    from peft import LoraConfig, get_peft_model

    from prefopt.models.inference import load_for_inference

    base = save_tiny_model(tmp_path / "base", seed=0)
    torch.manual_seed(4)
    peft_model = get_peft_model(
        tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.peft_config["default"].base_model_name_or_path = base
    final = tmp_path / "run" / "final"
    peft_model.save_pretrained(final)
    byte_tokenizer().save_pretrained(final)
    model, tok = load_for_inference(str(final))
    merged = peft_model.merge_and_unload().eval()
    settings = SampleSettings(num_samples=1, max_new_tokens=8, temperature=0)
    assert [g.completion_ids for g in sample_prompts(model, tok, PROMPTS, settings)] == [
        g.completion_ids for g in sample_prompts(merged, tok, PROMPTS, settings)
    ]
    base_model = tiny_llama(0)
    assert [g.completion_ids for g in sample_prompts(model, tok, PROMPTS, settings)] != [
        g.completion_ids for g in sample_prompts(base_model, tok, PROMPTS, settings)
    ]


# -- the command -------------------------------------------------------------------------------------


def test_cli_sample_writes_prompt_completions_ids_finished_rewards_and_columns(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p, "answer": "4", "topic": i}) + "\n" for i, p in enumerate(PROMPTS))
    )
    out = tmp_path / "samples.jsonl"
    argv = ["sample", "--model", model, "--prompts", str(prompts), "--num-samples", "3", "--max-new-tokens", "5"]
    argv += ["--seed", "1", "--output", str(out), "--reward", "exact_match"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["topic"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        assert len(row["completions"]) == len(row["completion_ids"]) == len(row["finished"]) == len(row["rewards"]) == 3
        assert row["answer"] == "4" and set(row["rewards"]) <= {0.0, 1.0}
    assert "12 completions of 4 prompts" in capsys.readouterr().out
    first = out.read_text()
    assert main(argv) == 2 and "exists; choose another --output or pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0 and out.read_text() == first  # --seed: the same file again


def test_cli_sample_bad_inputs_are_one_line_errors(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "2+2?"}\n')
    base = ["sample", "--model", model, "--num-samples", "2", "--max-new-tokens", "3"]
    assert main(base + ["--prompts", str(bad), "--output", str(tmp_path / "a.jsonl")]) == 2
    assert "bad.jsonl:1: missing field 'prompt'" in capsys.readouterr().err
    module = tmp_path / "wrong_count.py"
    module.write_text(
        "from prefopt.rewards import register_reward\n"
        "@register_reward('test_sample_wrong_count')\n"
        "def f(prompts, completions, **columns):\n    return [0.0]\n"
    )
    argv = base + ["--prompts", "data_samples/arithmetic.jsonl", "--limit", "2", "--output", str(tmp_path / "b.jsonl")]
    assert main(argv + ["--reward", "test_sample_wrong_count", "--reward-module", str(module)]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip().splitlines()[-1]
        == "prefopt: error: reward 'test_sample_wrong_count' returned 1 scores for 4 completions"
    )
    assert not (tmp_path / "b.jsonl").exists()
    assert main(argv + ["--reward", "reward_model", "--reward-arg", f"path={model}"]) == 2
    assert "is not a sequence classifier" in capsys.readouterr().err


def test_preference_file_prompts_can_be_sampled():
    prompts, _ = load_prompts("data_samples/conversational.jsonl")
    model, tok = tiny_llama(0), byte_tokenizer()
    samples = sample_prompts(model, tok, prompts[:2], SampleSettings(num_samples=2, max_new_tokens=3, temperature=0))
    rendered = tok.apply_chat_template(prompts[0].prompt, tokenize=False, add_generation_prompt=True)
    assert samples[0].prompt_ids == tok(rendered, add_special_tokens=False)["input_ids"]


def test_bench_sample_runs_both_methods(tmp_path):
    import subprocess
    import sys

    model = save_tiny_model(tmp_path / "m")
    argv = ["--model", model, "--prompts", "2", "--num-samples", "2", "--max-new-tokens", "2", "--no-warmup"]
    out = subprocess.run(
        [sys.executable, "-m", "prefopt.bench.sample", *argv], capture_output=True, text=True, check=True
    ).stdout
    assert "| plain generate(num_return_sequences=2) |" in out and "| prefopt sample (shared prefill) |" in out


def test_a_lora_model_is_prefilled_with_the_cache_keyword_of_its_base():
    """A PEFT model's forward takes **kwargs: the keyword comes from its base causal LM ("cache" in
    transformers 5.x; `past_key_values` is deprecated there), and its samples equal the merged
    model's token for token (greedy)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from prefopt.models.rollout import cache_keyword

    expected = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
    torch.manual_seed(1)
    peft_model = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    assert cache_keyword(peft_model) == cache_keyword(tiny_llama(0)) == expected
    tok, settings = byte_tokenizer(), SampleSettings(num_samples=2, max_new_tokens=6, temperature=0, batch_size=2)
    with torch.no_grad():
        adapted = sample_prompts(peft_model.eval(), tok, PROMPTS[:2], settings)
        merged = sample_prompts(peft_model.merge_and_unload().eval(), tok, PROMPTS[:2], settings)
    assert [g.completion_ids for g in adapted] == [g.completion_ids for g in merged]


def test_most_completions_empty_is_said_with_its_likely_cause():
    """A model that answers EOS at once (its head pinned to EOS): every completion is empty and
    counted; the warning names the cause when the prompts are plain text to a chat model."""
    from prefopt.models.rollout import empty_completions_warning

    model, tok = tiny_llama(0), byte_tokenizer()
    head = torch.nn.Linear(64, 259, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 50.0
    model.lm_head = head
    stats = SampleStats()
    sample_prompts(model, tok, PROMPTS, SampleSettings(num_samples=2, max_new_tokens=4, batch_size=4), stats)
    assert (stats.empty, stats.completions, stats.plain_prompts) == (8, 8, 4)
    assert stats.empty_warning(chat_model=True) == (
        "8 of 8 completions are empty (the model ended at once); the prompts are plain text and this model has a "
        'chat template: give them as messages ([{"role": "user", "content": ...}]) so the template is applied'
    )
    assert empty_completions_warning(8, 8, plain_prompts=False, chat_model=True) == (
        "8 of 8 completions are empty (the model ended at once)"
    )
    assert empty_completions_warning(3, 8, plain_prompts=True, chat_model=True) is None  # most are not empty
