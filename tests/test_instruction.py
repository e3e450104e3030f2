"""Instruction distillation: prompt/response rows, chat templates, response-only losses,
batched generation for Rouge-L, extra evaluation sets, SeqKD on instruction data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from makd_registry.cli import main
from makd_registry.data.sources import DataError
from makd_registry.data.tasks import load_task_data
from makd_registry.features import Feature, FeatureSet
from makd_registry.generation import continue_prompts
from makd_registry.objective.sections import DataSection

ROOT = Path(__file__).resolve().parents[1]
BPE = ROOT / "data" / "tokenizers" / "shakespeare-bpe"
SQUAD = ROOT / "data" / "squad-instruct"
SELF_INSTRUCT = ROOT / "data" / "self-instruct" / "user_oriented_instructions.jsonl"

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BPE)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "makd-cache"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def spec(**kw) -> DataSection:
    return DataSection(task="instruction", **kw)


ROWS = [
    {"instruction": "Name the river.", "input": "The Rhine flows north.", "output": "The Rhine"},
    {"instruction": "Say hello.", "input": "", "output": "Hello there"},
]


def test_training_rows_are_prompt_then_response_with_the_loss_on_the_response(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", ROWS)
    data = load_task_data(spec(train=str(f), validation=str(f)), tok, base_dir=tmp_path)
    eos = tok.eos_token_id
    for i, row in enumerate(data.train):
        prompt = ROWS[i]["instruction"] + "\n\n"
        if ROWS[i]["input"]:
            prompt += ROWS[i]["input"] + "\n\n"
        p = tok(prompt)["input_ids"]
        r = tok(ROWS[i]["output"], add_special_tokens=False)["input_ids"] + [eos]
        assert row["input_ids"] == p + r
        assert row["labels"] == [-100] * len(p) + r
        assert row["loss_mask"] == [0] * len(p) + [1] * len(r)
        assert row["prompt_length"] == len(p)
        # evaluation generates from exactly the prompt tokens training saw
        assert data.validation_raw["prompt_ids"][i] == p
    assert data.validation_raw["references"] == [r["output"] for r in ROWS]


def test_loss_on_all_labels_every_token_and_sets_no_loss_mask(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", ROWS)
    data = load_task_data(
        spec(train=str(f), validation=str(f), loss_on="all"), tok, base_dir=tmp_path
    )
    row = data.train[0]
    assert row["labels"] == row["input_ids"]
    assert "loss_mask" not in data.train.column_names
    # evaluation still measures the responses' perplexity
    held = data.validation[0]
    n = held["prompt_length"]
    assert held["labels"] == [-100] * n + held["input_ids"][n:]


def test_a_long_prompt_is_shortened_inside_its_input_keeping_separator_and_response(tmp_path, tok):
    long = {"instruction": "Find it.", "input": "word " * 300 + "END", "output": "the answer"}
    f = write_jsonl(tmp_path / "t.jsonl", [long])
    data = load_task_data(spec(train=str(f), max_length=48), tok, base_dir=tmp_path)
    row = data.train[0]
    assert len(row["input_ids"]) <= 48
    text = tok.decode(row["input_ids"])
    assert text.startswith("Find it.\n\nword word")
    assert "END" not in text  # the input was cut at its end
    assert text.endswith("\n\nthe answer" + tok.eos_token)  # separator and response whole


def test_chat_messages_use_the_template_and_train_on_the_assistant_turn(tmp_path, tok):
    tok = AutoTokenizer.from_pretrained(BPE)
    tok.chat_template = CHAT
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}])
    data = load_task_data(
        spec(train=str(f), validation=str(f), messages_column="messages"), tok, base_dir=tmp_path
    )
    row = data.train[0]
    n = row["prompt_length"]
    assert tok.decode(row["input_ids"][:n]) == (
        "<|system|>Be brief.<|end|><|user|>Capital of France?<|end|><|assistant|>"
    )
    assert tok.decode(row["input_ids"][n:]) == "Paris<|end|>"  # the template's end of turn
    assert sum(row["loss_mask"]) == len(row["input_ids"]) - n
    assert data.validation_raw["prompt_ids"][0] == row["input_ids"][:n]


def test_template_chat_renders_instruction_columns_as_a_user_turn(tmp_path, tok):
    tok = AutoTokenizer.from_pretrained(BPE)
    tok.chat_template = CHAT
    f = write_jsonl(tmp_path / "t.jsonl", ROWS[:1])
    data = load_task_data(spec(train=str(f), template="chat"), tok, base_dir=tmp_path)
    row = data.train[0]
    assert tok.decode(row["input_ids"][: row["prompt_length"]]) == (
        "<|user|>Name the river.\n\nThe Rhine flows north.<|end|><|assistant|>"
    )


def test_a_chat_template_that_the_tokenizer_lacks_is_a_data_error(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(DataError, match="has none: use template: plain"):
        load_task_data(spec(train=str(f), template="chat"), tok, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("cell", "why"),
    [
        ("hi", "not a list of at least two messages"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}], "non-blank"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "'user' message"),
    ],
)
def test_malformed_messages_are_refused_with_the_rows(tmp_path, tok, cell, why):
    tok = AutoTokenizer.from_pretrained(BPE)
    tok.chat_template = CHAT
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": good}, {"messages": cell}])
    with pytest.raises(DataError, match=rf"column 'messages'.*row 2;.*{why}"):
        load_task_data(spec(train=str(f), messages_column="messages"), tok, base_dir=tmp_path)


def test_instruction_options_are_refused_on_other_tasks():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="applies to task: instruction"):
        DataSection(task="causal_lm", loss_on="all")
    with pytest.raises(ValidationError, match="identifiers"):
        DataSection(task="instruction", extra_validation={"self instruct": "x.jsonl"})


# -- response-only losses -----------------------------------------------------------------


def _features(loss_mask, perturb=None, *, causal=True, seed=0):
    """A decoder FeatureSet with (optionally) the student's features changed at ``perturb``
    positions (B, T) bool."""
    g = torch.Generator().manual_seed(seed)
    b, t, h, d, v = 2, 7, 2, 8, 11
    teacher = {
        (Feature.HIDDEN, 0): torch.randn(b, t, h * d, generator=g),
        (Feature.LOGITS, None): torch.randn(b, t, v, generator=g),
        (Feature.ATTENTION_QUERY, 0): torch.randn(b, h, t, d, generator=g),
        (Feature.ATTENTION_KEY, 0): torch.randn(b, h, t, d, generator=g),
    }
    student = {k: torch.randn(x.shape, generator=g) for k, x in teacher.items()}
    if perturb is not None:
        noise = torch.Generator().manual_seed(99)
        for key in student:
            x = student[key]
            if key[0] is Feature.ATTENTION_KEY:
                continue  # keys of prompt tokens are attended by response rows
            where = perturb[:, None, :, None] if x.dim() == 4 else perturb[..., None]
            student[key] = torch.where(where, torch.randn(x.shape, generator=noise) * 9, x)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 5:] = 0
    return FeatureSet(
        teacher_features=teacher,
        student_features=student,
        attention_mask=mask,
        labels=None,
        loss_mask=loss_mask,
        causal=causal,
    )


LOSS_MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]])


@pytest.mark.parametrize(
    "text",
    [
        "{type: hidden_mse, layers: [[0, 0]]}",
        "{type: attention_kl, layers: [[0, 0]]}",
        "{type: logits_kd}",
        "{type: logits_kd, divergence: jsd}",
        "{type: logits_kd, temperature: 2.0}",
    ],
)
def test_token_level_terms_average_over_the_loss_mask_only(text):
    from makd_registry.features import ModelInfo
    from makd_registry.testing import registry_with, resolve

    aspect = resolve(
        "teacher: {config: {num_hidden_layers: 1}}\nstudent: {config: {num_hidden_layers: 1}}\n"
        f"objective: {text}\n",
        registry_with(),
    ).root
    info = ModelInfo(num_layers=1, hidden_size=16, num_heads=2, vocab_size=11, is_decoder=True)
    aspect.build(info, info)
    base = aspect.loss(_features(LOSS_MASK))
    # outside the loss: prompt tokens (for logits, the positions before the response)
    outside = ~LOSS_MASK.bool()
    if "logits_kd" in text:
        outside = ~_features(LOSS_MASK).prediction_mask().bool()
    changed = aspect.loss(_features(LOSS_MASK, perturb=outside))
    assert torch.allclose(base, changed, rtol=1e-5, atol=1e-6)
    everywhere = aspect.loss(_features(None))
    assert not torch.allclose(base, everywhere)  # the mask mattered


def test_prediction_mask_of_a_causal_model_is_the_loss_mask_shifted_left():
    fs = _features(LOSS_MASK)
    expect = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0]])
    assert fs.prediction_mask().tolist() == expect.tolist()
    assert fs.token_mask() is LOSS_MASK
    plain = _features(None)
    assert plain.prediction_mask() is plain.attention_mask is plain.token_mask()


# -- generation and evaluation -------------------------------------------------------------


def _tiny_decoder(vocab: int = 4096) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(config).eval()


def test_batched_generation_gives_what_one_by_one_gives():
    model = _tiny_decoder(64)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    one = [
        continue_prompts(model, [p], max_new_tokens=6, pad_id=0, eos_id=3, device="cpu")[0]
        for p in prompts
    ]
    batched = continue_prompts(
        model, prompts, max_new_tokens=6, pad_id=0, eos_id=3, device="cpu", batch_size=3
    )
    assert batched == one and all(1 <= len(c) <= 6 for c in one)


def test_a_continuation_stops_after_its_first_eos():
    model = _tiny_decoder(64)
    free = continue_prompts(
        model, [[5, 6, 7]], max_new_tokens=8, pad_id=1, eos_id=None, device="cpu"
    )
    stop = free[0][2]
    cut = continue_prompts(
        model, [[5, 6, 7]], max_new_tokens=8, pad_id=1, eos_id=stop, device="cpu"
    )
    assert cut[0] == free[0][: free[0].index(stop) + 1]


INSTRUCTION = """\
teacher:
  config: {{model_type: qwen2, vocab_size: 4096, hidden_size: 32, intermediate_size: 64,
    num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
    max_position_embeddings: 256, tie_word_embeddings: true, bos_token_id: 0,
    eos_token_id: 0, pad_token_id: 0}}
  tokenizer: {bpe}
  finetune: {{steps: 4, learning_rate: 1.0e-3}}
student:
  teacher_layers: [1]
data:
  task: instruction
  train: {train}
  validation: {dev}
  extra_validation: {{self_instruct: {selfinst}}}
  max_length: 96
  max_new_tokens: 6
  train_limit: 24
  validation_limit: 6
training:
  steps: 3
  batch_size: 4
  log_every: 1
objective:
{objective}
"""

MAKD = """\
  type: sum
  layers: uniform
  terms:
    - {type: attention_kl}
    - {type: hidden_mse}
    - {type: mha_matrix, projections: [q, o], input: teacher}
    - {type: logits_kd}
    - {type: ce}
"""


def write_instruction(tmp_path: Path, objective: str = MAKD, **fmt) -> Path:
    path = tmp_path / "inst.yaml"
    path.write_text(
        INSTRUCTION.format(
            bpe=BPE,
            train=SQUAD / "train.jsonl",
            dev=SQUAD / "dev.jsonl",
            selfinst=SELF_INSTRUCT,
            objective=objective,
            **fmt,
        )
    )
    return path


def test_makd_trains_an_instruction_student_and_reports_both_evaluation_sets(tmp_path, monkeypatch):
    from makd_registry.capture.extractor import FeatureExtractor

    seen = []
    original = FeatureExtractor.__call__

    def spy(self, batch, **kw):
        features, out = original(self, batch, **kw)
        if self.teacher is not None:
            seen.append((features.loss_mask, batch["labels"], batch["input_ids"]))
        return features, out

    monkeypatch.setattr(FeatureExtractor, "__call__", spy)
    path = write_instruction(tmp_path)
    assert main(["run", str(path), "--output", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    for side in ("student", "teacher"):
        scores = summary[side]
        assert 0 <= scores["rouge_l"] <= 100 and scores["perplexity"] > 1
        assert 0 <= scores["self_instruct.rouge_l"] <= 100
        assert scores["self_instruct.perplexity"] > 1
    loss_mask, labels, ids = seen[0]
    assert loss_mask is not None and 0 < int(loss_mask.sum()) < int((ids != 0).sum())
    assert torch.equal(loss_mask.bool(), labels != -100)  # the response tokens


def test_seqkd_on_instruction_data_trains_on_the_teachers_answers(tmp_path):
    from rich.console import Console

    from makd_registry.engine.run import Run, RunOptions

    path = write_instruction(tmp_path, "  type: seqkd\n  max_new_tokens: 5\n")
    run = Run(path, RunOptions(output=tmp_path / "r"), Console(quiet=True))
    run.world = __import__("makd_registry.engine.distributed", fromlist=["World"]).World()
    run._check_run_dir()
    plan = run.plan()
    prompts = [r["input_ids"][: r["prompt_length"]] for r in plan.data.train]
    setup = run.setup(plan)
    rows = list(plan.data.train)
    for row, prompt in zip(rows, prompts, strict=True):
        n = row["prompt_length"]
        assert row["input_ids"][:n] == prompt
        answer = row["generated"][n:]
        assert 1 <= len(answer) <= 5 and -100 not in answer
        assert row["generated"][:n] == [-100] * n
        assert row["labels"] == row["generated"] and row["loss_mask"] == [0] * n + [1] * len(answer)
    assert setup.teacher is not None


def test_attention_kl_with_a_query_mask_averages_those_rows_over_every_real_key():
    from makd_registry import losses

    g = torch.Generator().manual_seed(3)
    b, h, t, d = 2, 2, 6, 4
    q_t, k_t, q_s, k_s = (torch.randn(b, h, t, d, generator=g) for _ in range(4))
    keys = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    rows = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    lt = losses.attention_log_probs(q_t, k_t, attention_mask=keys, causal=True)
    s = losses.attention_scores(q_s, k_s, attention_mask=keys, causal=True).requires_grad_()
    fused = losses.attention_kl_from_scores(lt, s, keys, query_mask=rows)
    plain = losses.attention_kl(lt, s.log_softmax(-1), keys, query_mask=rows)
    expected, n = 0.0, 0
    for i in range(b):
        for j in range(t):
            if rows[i, j]:
                valid = keys[i].bool()
                p = lt[i, :, j, valid].exp()
                expected += (p * (lt[i, :, j, valid] - s[i, :, j, valid].log_softmax(-1))).sum()
                n += h
    assert fused.item() == pytest.approx((expected / n).item(), rel=1e-5)
    assert plain.item() == pytest.approx(fused.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(fused, s)
    assert grad[~rows.bool()[:, None, :, None].expand_as(grad)].abs().max() == 0


def test_kd_and_ce_in_one_pass_take_the_ce_mask_apart_from_the_kd_mask():
    from makd_registry import losses

    g = torch.Generator().manual_seed(4)
    z_s = torch.randn(2, 7, 13, generator=g, requires_grad=True)
    z_t = torch.randn(2, 7, 13, generator=g)
    labels = torch.randint(0, 13, (2, 7), generator=g)
    labels[:, :3] = -100  # the prompt
    kd_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0]])
    ce_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    kd, ce = losses.kd_and_cross_entropy(
        z_s, z_t, labels, next_token=True, mask=kd_mask, ce_mask=ce_mask
    )
    ref_kd = losses.kd_divergence(z_s, z_t, mask=kd_mask)
    ref_ce = losses.next_token_cross_entropy(z_s, labels, ce_mask)
    assert kd.item() == pytest.approx(ref_kd.item(), rel=1e-6)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-6)
    (g1,) = torch.autograd.grad(kd + 0.5 * ce, z_s)
    (g2,) = torch.autograd.grad(ref_kd + 0.5 * ref_ce, z_s)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["sft", "kd", "seqkd", "gkd", "makd"])
def test_a_shipped_instruction_objective_trains_end_to_end(name, tmp_path):
    tiny = [
        "teacher.config.hidden_size=32",
        "teacher.config.intermediate_size=64",
        "teacher.config.num_attention_heads=4",
        "teacher.finetune.steps=2",
        "teacher.finetune.warmup_steps=0",
        "data.max_length=96",
        "data.max_new_tokens=4",
        "data.train_limit=16",
        "data.validation_limit=4",
        "training.steps=2",
        "training.batch_size=4",
        "training.warmup_steps=0",
        "training.eval_every=2",
        "training.checkpoint_every=2",
    ]
    if name in ("seqkd", "gkd"):
        tiny.append("objective.max_new_tokens=4")
    args = ["run", str(ROOT / "objectives" / f"instruct-{name}.yaml"), "-o", str(tmp_path / "r")]
    for item in tiny:
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert {"rouge_l", "perplexity", "self_instruct.rouge_l"} <= summary["student"].keys()
