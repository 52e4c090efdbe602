"""generate/, eval/ on a small SSA checkpoint with the bundled GPT-2 tokenizer: each tool as its README example
runs it, and each number checked against a direct computation with the model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_temperatures, write_sums_task

from lit_gpt import GPT, Config
from lit_gpt.checkpoint import load_checkpoint, save_model_dir
from lit_gpt.data.prepare import GPT2_TOKENIZER
from lit_gpt.evaluation import (
    count_words,
    first_integer,
    passkey_prompt,
    sliding_window_nll,
)
from lit_gpt.generation import generate, generate_text, logits_to_probs
from lit_gpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A random debug-size model with SSA (non-trivial temperatures) and the GPT-2 tokenizer."""
    torch.manual_seed(0)
    model = GPT(Config.from_name("debug", vocab_size=50257, block_size=512, attention_temperature="ssa"))
    randomize_temperatures(model)
    folder = tmp_path_factory.mktemp("tools") / "ssa-debug"
    save_model_dir(model, folder, tokenizer_dir=GPT2_TOKENIZER)
    return folder


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True)


def test_generate_cli_streams_a_completion(checkpoint):
    result = run("generate/base.py", "--checkpoint_dir", str(checkpoint), "--prompt", "Hello there",
                 "--max_new_tokens", "12", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello there") and len(result.stdout) > len("Hello there")
    assert "[12 tokens in" in result.stderr and "tokens/s" in result.stderr


def test_generate_refuses_too_long_and_empty_prompts(checkpoint):
    long_prompt = "word " * 600
    result = run("generate/base.py", "--checkpoint_dir", str(checkpoint), "--prompt", long_prompt)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: The prompt (601 tokens) plus 50 new tokens")
    result = run("generate/base.py", "--checkpoint_dir", str(checkpoint), "--prompt", long_prompt, "--truncate",
                 "--max_new_tokens", "3")
    assert result.returncode == 0, result.stderr
    result = run("generate/base.py", "--checkpoint_dir", str(checkpoint), "--prompt", "")
    assert result.returncode == 1 and "The prompt is empty" in result.stderr


def test_cached_generation_equals_generation_without_cache(checkpoint):
    model = load_checkpoint(checkpoint).eval()
    prompt = Tokenizer(checkpoint).encode("The quick brown fox").unsqueeze(0)
    cached = torch.cat(list(generate(model, prompt, 15)), dim=1)
    tokens = prompt
    with torch.no_grad():
        for _ in range(15):
            tokens = torch.cat((tokens, model(tokens)[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(cached, tokens[:, prompt.size(1) :])


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert logits_to_probs(logits, top_k=2)[0, 2:].sum() == 0
    probs = logits_to_probs(logits, top_p=0.6)  # the first token alone holds 0.61 of the mass
    assert probs[0, 0] == 1.0
    model = GPT(Config.from_name("debug")).eval()
    prompt = torch.tensor([[1, 2, 3]])
    draws = [torch.cat(list(generate(model, prompt, 8, temperature=1.0,
                                     generator=torch.Generator().manual_seed(7))), 1) for _ in range(2)]
    assert torch.equal(*draws)


def test_stop_strings_end_the_completion(checkpoint):
    model, tokenizer = load_checkpoint(checkpoint).eval(), Tokenizer(checkpoint)
    full = generate_text(model, tokenizer, "Once", max_new_tokens=20)
    stop = full[3:6]
    assert stop and generate_text(model, tokenizer, "Once", max_new_tokens=20, stop=[stop]) == full[: full.index(stop)]


def test_generate_cli_takes_one_stop_string(checkpoint):
    args = ["generate/base.py", "--checkpoint_dir", str(checkpoint), "--prompt", "Once", "--max_new_tokens", "20",
            "--temperature", "0"]
    full = run(*args).stdout[len("Once"):].rstrip("\n")
    stop = full[3:6]
    result = run(*args, "--stop", stop)
    assert result.returncode == 0, result.stderr
    assert stop and result.stdout[len("Once"):].rstrip("\n") == full[: full.index(stop)]


def test_perplexity_equals_exp_of_the_mean_cross_entropy(checkpoint, tmp_path):
    text = "The cat sat on the mat. " * 30
    (tmp_path / "text.txt").write_text(text)
    result = run("eval/perplexity.py", "--checkpoint_dir", str(checkpoint), "--data", str(tmp_path / "text.txt"),
                 "--output_file", str(tmp_path / "ppl.json"))
    assert result.returncode == 0, result.stderr
    reported = json.loads((tmp_path / "ppl.json").read_text())
    model, ids = load_checkpoint(checkpoint).eval(), Tokenizer(checkpoint).encode(text)
    with torch.no_grad():
        loss = F.cross_entropy(model(ids[None, :-1])[0], ids[1:])
    assert reported["tokens"] == ids.numel() - 1
    assert reported["token_perplexity"] == pytest.approx(loss.exp().item(), rel=1e-4)
    assert reported["word_perplexity"] == pytest.approx(math.exp(loss.item() * (ids.numel() - 1) / count_words(text)),
                                                        rel=1e-4)


def test_sliding_window_scores_every_token_once_with_enough_context(checkpoint):
    model, ids = load_checkpoint(checkpoint).eval(), torch.randint(0, 50257, (300,))
    nll, count = sliding_window_nll(model, ids, window=64, stride=16, progress=False)
    assert count == ids.numel() - 1
    expected = 0.0
    with torch.no_grad():  # token i is predicted after min(i, 48 + (i - 1) % 16 + 1 ...) tokens: recompute per window
        scored = 1
        for begin in range(0, ids.numel() - 1, 16):
            end = min(begin + 65, ids.numel())
            logprobs = F.log_softmax(model(ids[None, begin : end - 1])[0], -1)
            for target in range(max(scored, begin + 1), end):
                expected -= logprobs[target - begin - 1, ids[target]].item()
            scored = end
            if end == ids.numel():
                break
    assert nll == pytest.approx(expected, rel=1e-5)


def test_passkey_prompt_and_scorer(checkpoint):
    tokenizer = Tokenizer(checkpoint)
    for depth in (0.0, 0.5, 1.0):
        prompt = passkey_prompt(tokenizer, 300, depth, 12345)
        assert abs(tokenizer.encode(prompt).numel() - 300) < 30
        assert prompt.count("The pass key is 12345. Remember it. 12345 is the pass key.") == 1
        assert prompt.endswith("What is the pass key? The pass key is")
    early, late = (passkey_prompt(tokenizer, 300, d, 11111).index("11111") for d in (0.0, 1.0))
    assert early < late
    assert first_integer(" 12345. Remember") == 12345 and first_integer(" none") is None
    assert first_integer(" 1234 and 12345") == 1234


def test_passkey_cli_writes_grid_and_heatmap(checkpoint, tmp_path):
    result = run("eval/passkey.py", "--checkpoint_dir", str(checkpoint), "--lengths", "[128, 256]", "--depths",
                 "[0.0, 1.0]", "--trials", "2", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "passkey.json").read_text())
    assert len(report["cells"]) == 4 and set(report["per_length"]) == {"128", "256"}
    assert all(0.0 <= c["accuracy"] <= 1.0 and len(c["answers"]) == 2 for c in report["cells"])
    assert (tmp_path / "passkey.png").stat().st_size > 0 and (tmp_path / "passkey.csv").read_text().count("\n") == 5


@pytest.mark.parametrize("positions", ["none", "rope"])
def test_passkey_beyond_the_block_only_without_positional_encoding(checkpoint, tmp_path, positions):
    config = Config.from_file(checkpoint, block_size=64, position_embedding=positions)
    folder = tmp_path / positions
    save_model_dir(GPT(config), folder, tokenizer_dir=checkpoint)
    result = run("eval/passkey.py", "--checkpoint_dir", str(folder), "--lengths", "[128]", "--depths", "[0.5]",
                 "--trials", "1", "--output_dir", str(tmp_path / "out"))
    if positions == "none":  # NoPE has no position table: it reads 128 tokens though trained at 64
        assert result.returncode == 0, result.stderr
        assert set(json.loads((tmp_path / "out" / "passkey.json").read_text())["per_length"]) == {"128"}
    else:
        assert result.returncode != 0 and "position_embedding: none" in result.stderr


def test_attention_cli_compares_two_checkpoints(checkpoint, tmp_path):
    vanilla = tmp_path / "vanilla"
    config = Config.from_file(checkpoint, attention_temperature="none")
    save_model_dir(GPT(config), vanilla, tokenizer_dir=checkpoint)
    result = run("eval/attention.py", "--checkpoint_dir", str(checkpoint), "--compare_dir", str(vanilla),
                 "--max_tokens", "64", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "attention.json").read_text())
    assert [r["attention_temperature"] for r in report] == ["ssa", "none"]
    layer = report[0]["layers"][0]
    assert len(layer["query_temperature"]) == 64 and report[1]["layers"][0]["query_temperature"] is None
    assert all(0.0 <= e <= 1.0 + 1e-6 for e in layer["normalized_entropy"])
    model = load_checkpoint(checkpoint)
    slopes = [model.transformer.h[0].attn.query_temperature.position_param.exp().tolist(),
              model.transformer.h[0].attn.value_temperature.position_param.exp().tolist()]
    assert layer["query_slopes"]["per_head"] == pytest.approx(slopes[0])
    assert layer["value_slopes"]["per_head"] == pytest.approx(slopes[1])
    assert layer["query_slopes"]["min"] == pytest.approx(min(slopes[0]))
    assert layer["query_token_term_std"]["median"] > 0  # randomised token weights: the term varies over tokens
    assert "what the temperatures learned" in result.stdout and "query_slopes" not in report[1]["layers"][0]
    for name in ("attention_stats.png", "attention_maps.png", "temperatures.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_attention_cli_shows_selective_attentions_mask(checkpoint, tmp_path):
    selective = tmp_path / "selective"
    config = Config.from_file(checkpoint, attention_temperature="none", selective_mask="leviathan")
    torch.manual_seed(0)
    save_model_dir(GPT(config), selective, tokenizer_dir=checkpoint)
    result = run("eval/attention.py", "--checkpoint_dir", str(selective), "--max_tokens", "48", "--output_dir",
                 str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    layer = json.loads((tmp_path / "out" / "attention.json").read_text())[0]["layers"][0]
    assert layer["selective_mask"]["max"] > 0 and 0 <= layer["selective_mask"]["share_above_1"] <= 1
    assert "selective mask F mean" in result.stdout
    assert (tmp_path / "out" / "selective_mask.png").stat().st_size > 0


lm_eval = pytest.importorskip("lm_eval")


def test_lm_eval_loglikelihood_matches_the_model(checkpoint):
    from lm_eval.api.instance import Instance

    from lit_gpt.harness import LitLM

    lm = LitLM(str(checkpoint))
    context, continuation = "The capital of France is", " Paris"
    request = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    (logprob, _), = lm.loglikelihood([request], disable_tqdm=True)
    tokenizer, model = Tokenizer(checkpoint), load_checkpoint(checkpoint).eval()
    ids = tokenizer.encode(context + continuation)
    n = ids.numel() - tokenizer.encode(context).numel()
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids[None, :-1])[0], -1)
    expected = sum(logprobs[i - 1, ids[i]].item() for i in range(ids.numel() - n, ids.numel()))
    assert logprob == pytest.approx(expected, rel=1e-5)
    rolling = Instance(request_type="loglikelihood_rolling", doc={}, arguments=("one two three " * 200,), idx=0)
    (total,) = lm.loglikelihood_rolling([rolling], disable_tqdm=True)
    assert total < 0 and math.isfinite(total)


@pytest.mark.parametrize("attention", [{}, {"attention_temperature": "ssa"}, {"selective_mask": "leviathan"},
                                       {"attention_gate": "headwise", "sliding_window": 12}])
def test_lm_eval_batched_scores_equal_one_request_at_a_time(attention, tmp_path):
    """Batched, padded, the endings of a shared context packed into one row after it (nested, repeated and
    unrelated endings): every log-likelihood and greedy flag equals the adapter's own one-request forward (score),
    for models with and without SSA; a sliding window shorter than a packed row splits it."""
    from lm_eval.api.instance import Instance

    from lit_gpt.harness import LitLM

    torch.manual_seed(0)
    model = GPT(Config.from_name("debug", vocab_size=50257, block_size=64, **attention))
    randomize_temperatures(model)
    save_model_dir(model, tmp_path / "model", tokenizer_dir=GPT2_TOKENIZER)
    lm = LitLM(str(tmp_path / "model"), batch_size=3)
    contexts = ["The cat sat on the", "Two plus two is", "Once upon a time there was a", ""]
    endings = [" mat", " mat and slept", " four", " a dog", " princess who lived far away", " mat"]
    pairs = [(c, e) for c in contexts for e in endings] + [("word " * 80, " end")]  # the last is cut to max_length
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    batched = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, ending), (logprob, greedy) in zip(pairs, batched):
        head, tail = lm.encode_pair(context, ending) if context else ([lm.prefix_token_id], lm.encode(ending))
        expected, expected_greedy = lm.score(head, tail)
        assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    texts = ["one two three " * 40, "a short text", "one two three " * 40 + "four"]
    rolling = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in
               enumerate(texts)]
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for text, total in zip(texts, lm.loglikelihood_rolling(rolling, disable_tqdm=True)):
        windows = get_rolling_token_windows(token_list=lm.encode(text), prefix_token=lm.prefix_token_id,
                                            max_seq_len=lm.max_length, context_len=1)
        assert total == pytest.approx(sum(lm.score(*make_disjoint_window(w))[0] for w in windows), abs=1e-4)


@pytest.mark.parametrize("attention", [{}, {"attention_temperature": "ssa"}, {"selective_mask": "leviathan"}])
def test_lm_eval_batched_generation_equals_one_prompt_at_a_time(attention, tmp_path):
    """generate_until decodes prompts of different lengths as one left-padded batch: each completion (greedy, its
    own stop strings, EOS) equals generate_text's for that prompt alone, with and without SSA and with selective
    attention. The model is random: its greedy tokens vary and follow any change of its inputs (a trained debug
    model repeats one newline), so a padding token that leaked into a row's attention would change that row."""
    from lm_eval.api.instance import Instance

    from lit_gpt.harness import LitLM

    torch.manual_seed(0)
    model = GPT(Config.from_name("debug", vocab_size=50257, block_size=64, **attention))
    randomize_temperatures(model)
    save_model_dir(model, tmp_path / "model", tokenizer_dir=GPT2_TOKENIZER)
    lm = LitLM(str(tmp_path / "model"), batch_size=3)
    prompts = ["It is a truth universally acknowledged, that", "She", "Mr. Darcy said that he had never",
               "The", "Elizabeth walked"]
    settings = [{"until": ["e"], "max_gen_toks": 20}, {"until": ["a", "o"], "max_gen_toks": 12},
                {"max_gen_toks": 9}]
    cases = [(p, kw) for p in prompts for kw in settings]
    requests = [Instance(request_type="generate_until", doc={}, arguments=case, idx=i) for i, case in enumerate(cases)]
    batched = lm.generate_until(requests, disable_tqdm=True)
    alone = [generate_text(lm.model, lm.tokenizer, p, kw["max_gen_toks"], stop=kw.get("until"), truncate=True)
             for p, kw in cases]
    assert batched == alone
    assert len(set(alone)) == len(cases)  # every completion its own
    assert any(len(lm.encode(text)) < kw["max_gen_toks"] for (_, kw), text in zip(cases, alone))  # a stop string hit


def test_lm_eval_runs_a_local_task(checkpoint, tmp_path):
    tasks = write_sums_task(tmp_path, "tiny_sums")
    result = run("eval/lm_eval_harness.py", "--checkpoint_dir", str(checkpoint), "--tasks", "[tiny_sums]",
                 "--include_path", str(tasks), "--output_file", str(tmp_path / "results.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = json.loads((tmp_path / "results.json").read_text())["tiny_sums"]["acc,none"]
    assert accuracy in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_lm_eval_unknown_task_is_one_line(checkpoint):
    result = run("eval/lm_eval_harness.py", "--checkpoint_dir", str(checkpoint), "--tasks", "[not_a_task_x]")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: Unknown lm-evaluation-harness task")


def test_the_docs_agree_on_which_model_goes_in_compare_dir():
    """README, docs/evaluation.md and eval/attention.py's own help put the SSA model in --checkpoint_dir and its vanilla
    baseline in --compare_dir (they once said the opposite of each other)."""
    import re

    root = Path(__file__).resolve().parents[1]
    commands = []
    for path in [root / "README.md", root / "eval" / "attention.py", *sorted((root / "docs").glob("*.md"))]:
        commands += re.findall(r"eval/attention\.py --checkpoint_dir (\S+) --compare_dir (\S+)", path.read_text())
    assert len(commands) >= 3
    assert all("ssa" in first and "ssa" not in second for first, second in commands), commands


def test_the_docs_passkey_lengths_fit_the_model_they_name():
    """The README once gave lengths of 256 to 2048 tokens for the demo, which reads 256: every one was refused. Each
    passkey command on a demo checkpoint asks for lengths that leave the answer's 8 tokens room in its context."""
    import re

    root = Path(__file__).resolve().parents[1]
    block = Config.from_name("demo").block_size
    commands = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        commands += re.findall(r"eval/passkey\.py --checkpoint_dir out/demo\S* --lengths \"\[([\d, ]+)\]\"",
                               path.read_text())
    assert commands
    for lengths in commands:
        assert all(100 <= int(n) <= block - 8 for n in lengths.split(",")), (lengths, block)
