"""The PyTorch model against transformers, export against run.py and transformers, and the
training loop: exact resume after SIGKILL and after Ctrl-C, 2 processes = 1 process, bits
per byte by hand, bad input and divergence."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from twofile import data, export, run, tokenizer, train
from twofile.model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def hf_copy(model: Transformer):
    """The same weights in transformers' LlamaForCausalLM (the oracle): a name map only,
    since both rotate the halves of each head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.n_ff,
                                      num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                                      num_key_value_heads=c.n_head_kv, max_position_embeddings=c.context,
                                      rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                                      tie_word_embeddings=c.tie_embeddings)).eval()
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    parts = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn.attn_q": "self_attn.q_proj",
             "attn.attn_k": "self_attn.k_proj", "attn.attn_v": "self_attn.v_proj", "attn.attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {}
    for name, p in model.state_dict().items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            state[f"model.layers.{i}.{parts[rest.rsplit('.', 1)[0]]}.weight"] = p
        else:
            state[names[name]] = p
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing)
    if c.tie_embeddings:
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_model_matches_transformers(tie):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=96, context=32,
                              tie_embeddings=tie)).eval()
    ids = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        ours, theirs = model(ids), hf_copy(model)(ids).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_from_depth_fits_every_export_type():
    for depth in (2, 4, 6, 8, 12):
        c = ModelConfig.from_depth(depth, 4096, 256)
        assert c.n_embd % 32 == 0 and c.n_ff % 32 == 0 and c.n_head % c.n_head_kv == 0 and c.head_dim == 64


# --- a tiny prepared corpus and training runs --------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from conftest import SAMPLE_TEXT, varied_strings

    root = tmp_path_factory.mktemp("train")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(SAMPLE_TEXT + "\n".join(varied_strings(60, seed=i)))
    tok = tokenizer.train([SAMPLE_TEXT] * 3 + varied_strings(300, seed=9), 400, show_progress=False)
    tokenizer.save(tok, root / "tok.json")
    data.prepare([str(corpus)], str(root / "tok.json"), str(root / "data"), val_fraction=0.2, progress=False)
    return root / "data"


def tiny_config(data_dir, out, **kw) -> train.TrainConfig:
    base = dict(data=str(data_dir), out=str(out), depth=2, context=32, batch_tokens=512, micro_batch=8,
                max_steps=20, warmup_steps=4, lr=3e-3, eval_every=10, checkpoint_every=5, keep_checkpoints=50, seed=3,
                weight_decay=0.0, dropout=0.0,  # not planned (test_plan_fills_only_what_is_left_to_it's)
                compile=False)  # compilation takes longer than these runs (test_compiled_training_follows_eager's)
    return train.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    result = train.train(tiny_config(tiny_data, out), progress=False)
    return out, result


def test_training_learns_and_logs(trained_run):
    out, result = trained_run
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.5
    assert [r["step"] for r in records if "val_bpb" in r] == [10, 20]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "tokenizer.json").exists()
    assert [p.name for p in train.checkpoints(out)][-1] == "ckpt_0000020"
    assert 0 < result["val_bpb"] < 20 and result["mfu"] > 0


def test_time_budget_sets_the_step_count(tiny_data, tmp_path):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = train.train(tiny_config(tiny_data, tmp_path / "t", max_steps=0, time_budget=6.0, warmup_steps=10),
                         progress=False)
    state = json.loads((train.checkpoints(tmp_path / "t")[-1] / "state.json").read_text())
    # 7 probe steps, then at least one more; the run ends at the total it fixed
    assert result["step"] == state["step"] == state["total_steps"] > 7
    records = [json.loads(l) for l in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "val_bpb" in records[0]  # the probe's evaluation
    assert [r["step"] for r in records if "loss" in r] == list(range(8, result["step"] + 1))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored on return


def test_bits_per_byte_leaves_out_bos_targets(trained_run, tiny_data):
    """Oracle: per-token losses computed here from the final checkpoint's logits over the
    validation windows; bits per byte sum them without BOS targets (a BOS has no bytes in
    the text), the loss per token averages all of them."""
    out, result = trained_run
    state, weights, _ = train.load_checkpoint(train.checkpoints(out)[-1])
    assert state["step"] == result["step"] == 20  # the weights the final evaluation saw
    model = Transformer(ModelConfig(**state["model_config"]))
    model.load_state_dict(weights)
    manifest = data.load_manifest(tiny_data)
    losses, targets = [], []
    with torch.no_grad():
        for shard in data.open_split(tiny_data, "val"):
            for start in range(0, len(shard) - 1, 32):
                window = torch.from_numpy(np.asarray(shard[start:start + 33], dtype=np.int64))
                logp = torch.log_softmax(model(window[None, :-1])[0].double(), -1)
                losses += (-logp[torch.arange(len(window) - 1), window[1:]]).tolist()
                targets += window[1:].tolist()
    losses, targets = np.array(losses), np.array(targets)
    bos_targets = targets == manifest["bos_id"]
    assert bos_targets.sum() >= 1  # the validation split holds two documents
    ln2_bytes = np.log(2) * manifest["splits"]["val"]["bytes"]
    expected, with_bos = losses[~bos_targets].sum() / ln2_bytes, losses.sum() / ln2_bytes
    assert abs(with_bos - expected) > 1e-4 * expected  # the test can tell them apart
    assert result["val_bpb"] == pytest.approx(expected, rel=1e-5)
    assert result["val_loss"] == pytest.approx(losses.mean(), rel=1e-5)


def test_muon_equals_torch_muon_and_runs_newton_schulz_in_float32_without_native_bf16(monkeypatch):
    """Our Muon with bf16 Newton-Schulz gives torch.optim.Muon's parameters to the bit (the
    oracle, same hyperparameters, 4 steps, tall and wide matrices); with float32 (what CPUs
    without native bf16 get) it is torch's algorithm computed more precisely: within bf16's
    rounding of it."""
    torch.manual_seed(0)
    shapes = [(64, 96), (96, 64), (32, 32)]
    start = [torch.randn(s) for s in shapes]
    params = [[p.clone() for p in start] for _ in range(3)]
    ours_bf16 = train.Muon(params[0], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    ours_f32 = train.Muon(params[1], lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    theirs = torch.optim.Muon(params[2], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in range(4):
        grads = [torch.randn(s) for s in shapes]
        for group, opt in zip(params, (ours_bf16, ours_f32, theirs)):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(params[0], params[2])), step
        assert all((a - b).abs().max() <= 2e-3 for a, b in zip(params[1], params[2])), step
    assert not all(torch.equal(a, b) for a, b in zip(params[1], params[2]))  # float32 really ran
    model = Transformer(ModelConfig.from_depth(2, 300, 32))
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(train, "native_bf16", lambda device: native)
        muon = train.make_optimizer(model, train.TrainConfig(data=""))[0]
        assert type(muon) is train.Muon and muon.ns_dtype == dtype


@pytest.mark.parametrize("probe_cost, later_cost", [(0.1, 0.3), (0.3, 0.1)])
def test_time_budget_follows_the_machine_that_slows_or_speeds_up(tiny_data, tmp_path, monkeypatch, probe_cost,
                                                                  later_cost):
    """A machine that runs the first steps 3 times faster (or slower) than the rest: the run
    still ends at its budget, because the total is fixed again at each evaluation while the
    learning rate is flat. Time here is a fake clock that only training batches advance."""
    clock = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real_batch = train.data.train_batch

    def costly_batch(shards, batch, context, seed, step, index):
        clock[0] += (probe_cost if step < 7 else later_cost) / 2  # 2 micro-batches per step
        return real_batch(shards, batch, context, seed, step, index)

    monkeypatch.setattr(train.data, "train_batch", costly_batch)
    monkeypatch.setattr(train, "peak_flops", lambda device, dtype: 1e12)  # (timed on the real clock)
    result = train.train(tiny_config(tiny_data, tmp_path / "t", max_steps=0, time_budget=30.0, checkpoint_every=10**4),
                         progress=False)
    assert result["time"] == pytest.approx(30.0, abs=later_cost)
    state = json.loads((train.checkpoints(tmp_path / "t")[-1] / "state.json").read_text())
    assert result["step"] == state["step"] == state["total_steps"]
    assert result["lr"] < tiny_config(tiny_data, "").lr / 20  # the decay ran to its end


def test_plan_fills_only_what_is_left_to_it():
    """The deepest model whose tokens per parameter reach the threshold (parameters and FLOPs
    counted here on real models: 6 per weight, tied embeddings once, plus attention's
    12 x layers x width x context), regularization only past the passes over the data the
    rule allows (weight decay doubled past twice as many), and explicit settings kept."""
    cfg = train.TrainConfig(data="", max_steps=1000, batch_tokens=4096, context=128)
    tokens = 1000 * 4096

    def params(depth):
        c = ModelConfig.from_depth(depth, 4096, 128)
        return (sum(p.numel() for p in Transformer(c).parameters()) * 6 + 12 * depth * c.n_embd * 128) / 6

    expected = max(d for d in range(2, train.MAX_DEPTH + 1) if tokens >= train.TOKENS_PER_PARAM * params(d))
    few = train.plan(cfg, unique_tokens=int(tokens / (train.REGULARIZE_AFTER - 1)), vocab_size=4096, flops_per_s=1e12)
    assert (few.depth, few.weight_decay, few.dropout) == (expected, 0.0, 0.0)
    many = train.plan(cfg, unique_tokens=int(tokens / (train.REGULARIZE_AFTER + 1)), vocab_size=4096, flops_per_s=1e12)
    assert (many.depth, many.weight_decay, many.dropout) == (expected, train.WEIGHT_DECAY, train.DROPOUT)
    most = train.plan(cfg, unique_tokens=int(tokens / (2 * train.REGULARIZE_AFTER + 1)), vocab_size=4096,
                      flops_per_s=1e12)  # a smaller corpus: the cap on parameters per token picks the depth
    assert (most.weight_decay, most.dropout) == (2 * train.WEIGHT_DECAY, train.DROPOUT)
    kept = train.plan(replace(cfg, depth=3, weight_decay=0.0, dropout=0.2), unique_tokens=1, vocab_size=4096,
                      flops_per_s=1e12)
    assert (kept.depth, kept.weight_decay, kept.dropout) == (3, 0.0, 0.2)
    # a time budget: more time (or a faster machine) never plans a smaller model
    timed = replace(cfg, max_steps=0)
    depths = [train.plan(replace(timed, time_budget=t), 10**9, 4096, 1e9).depth for t in (60, 300, 900, 3600, 36000)]
    assert depths == sorted(depths) and depths[0] < depths[-1]
    # but no model larger than its corpus allows, however long the budget: a corpus 8 times
    # the size lets the same budget plan a deeper model
    long = replace(timed, time_budget=10**7)
    small, large = (train.plan(long, n, 4096, 1e12).depth for n in (10**6, 8 * 10**6))
    assert params(small) <= train.PARAMS_PER_UNIQUE_TOKEN * 10**6 < params(small + 1)
    assert small < large <= train.MAX_DEPTH


def test_training_flops_measures_a_real_step_and_leaves_the_run_alone():
    """The plan's speed comes from timed training steps: a positive, finite FLOP/s, and the
    global random state (which seeds the run's model) exactly as it was."""
    rt = train.setup_runtime("float32")
    cfg = train.TrainConfig(data="", micro_batch=2, context=16)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    speed = train.training_flops(cfg, rt, vocab_size=256)
    assert torch.equal(torch.get_rng_state(), before)
    assert math.isfinite(speed) and speed > 0
    # the tokens a time budget allows grow with it in proportion
    timed = replace(cfg, max_steps=0, time_budget=60)
    assert train.expected_tokens(replace(timed, time_budget=120), 4, 256, speed) == pytest.approx(
        2 * train.expected_tokens(timed, 4, 256, speed))


def test_resume_keeps_the_planned_settings(tiny_data, tmp_path, monkeypatch):
    """What was planned at the start stays: a resumed run does not plan again (a noisy speed
    measurement could plan another depth)."""
    cfg = tiny_config(tiny_data, tmp_path / "r", depth=0, weight_decay=-1.0, dropout=-1.0, max_steps=10)
    train.train(cfg, progress=False)
    shutil.rmtree(train.checkpoints(cfg.out)[-1])
    first = json.loads((train.checkpoints(cfg.out)[-1] / "state.json").read_text())["train_config"]
    assert first["depth"] >= 2 and first["weight_decay"] >= 0 and first["dropout"] >= 0
    monkeypatch.setattr(train, "plan", lambda *a: pytest.fail("planned again on resume"))
    train.train(cfg, resume=True, progress=False)
    assert json.loads((train.checkpoints(cfg.out)[-1] / "state.json").read_text())["train_config"] == first


def test_compiled_training_follows_eager(tiny_data, tmp_path):
    """torch.compile (the default) trains as eager does: the same losses within float32's
    reordering of sums."""
    losses = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        train.train(tiny_config(tiny_data, out, max_steps=4, compile=compiled, precision="float32"), progress=False)
        losses[compiled] = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()
                            if "loss" in json.loads(l)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_precision_follows_the_hardware_unless_chosen(monkeypatch):
    """auto: bfloat16 autocast where the hardware multiplies bfloat16, float32 elsewhere; a
    choice is kept either way; anything else is a one-line error."""
    for native in (True, False):
        monkeypatch.setattr(train, "native_bf16", lambda device: native)
        assert train.setup_runtime("auto").autocast_dtype == (torch.bfloat16 if native else None)
        assert train.setup_runtime("bfloat16").autocast_dtype == torch.bfloat16
        assert train.setup_runtime("float32").autocast_dtype is None
    with pytest.raises(ValueError, match="--precision 'fp8' is not one of auto, bfloat16, float32"):
        train.setup_runtime("fp8")

def exported(out) -> tuple[dict, dict]:
    """The state and weights export writes (the best validation's)."""
    chosen = export.chosen_checkpoint(out)
    return json.loads((chosen / "state.json").read_text()), load_file(str(chosen / "model.safetensors"))


def test_export_f32_matches_pytorch_and_transformers(trained_run, tmp_path):
    out, _ = trained_run
    path = export.export(out, tmp_path / "m.gguf", "f32")
    state, weights = exported(out)
    model = Transformer(ModelConfig(**state["model_config"]))
    model.load_state_dict(weights)
    model.eval()
    ours = run.load(path)
    ids = ours.tokenize("The quick brown fox jumps over 12 lazy dogs.")[:32]  # the context is 32
    with torch.no_grad():
        expected = model(torch.tensor([ids])).numpy()[0]
    assert np.abs(ours.logits(ids) - expected).max() <= 1e-4
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(torch.tensor([ids])).logits[0] - torch.from_numpy(expected)).abs().max() <= 1e-4
    # the file carries the tokenizer and the chat template
    assert ours.tokenizer.encode("hi <|im_end|>", add_bos=False)[-1] == 3
    assert "<|im_start|>assistant" in ours.chat_prompt([{"role": "user", "content": "hi"}])


def test_export_writes_the_best_validation_not_the_last(tiny_data, tmp_path, monkeypatch):
    """A run whose validation gets worse after its second evaluation (scripted here) keeps
    that evaluation's weights as best_0000004, and only it; export writes them; a resumed run
    keeps comparing against it."""
    def script(*values):
        scripted = iter(values)
        monkeypatch.setattr(train, "evaluate", lambda *a, **k: dict.fromkeys(("val_loss", "val_bpb"), next(scripted)))

    script(3.0, 2.0, 2.5, 2.2, 2.1, 2.05)
    cfg = tiny_config(tiny_data, tmp_path / "r", max_steps=12, eval_every=2, checkpoint_every=2)
    train.train(cfg, progress=False)
    assert [p.name for p in (tmp_path / "r").glob("best_*")] == ["best_0000004"]
    best = load_file(str(tmp_path / "r" / "best_0000004" / "model.safetensors"))
    at_4 = train.load_checkpoint(tmp_path / "r" / "ckpt_0000004")[1]
    last = train.load_checkpoint(tmp_path / "r" / "ckpt_0000012")[1]
    assert all(torch.equal(best[k], at_4[k]) for k in at_4) and not torch.equal(best["token_embd.weight"],
                                                                                last["token_embd.weight"])
    path = export.export(cfg.out, tmp_path / "m.gguf", "f32")
    written = run.read_gguf(str(path)).tensors["token_embd.weight"].data.view(np.float32)
    assert np.array_equal(written, best["token_embd.weight"].numpy().reshape(-1))
    # resumed from step 8: 2.1 at step 10 does not beat the kept 2.0, 1.9 at step 12 does
    for step in (10, 12):
        shutil.rmtree(tmp_path / "r" / f"ckpt_{step:07d}")
    script(2.1, 1.9)
    train.train(cfg, resume=True, progress=False)
    assert [p.name for p in (tmp_path / "r").glob("best_*")] == ["best_0000012"]


@pytest.mark.parametrize("ftype", ["f16", "bf16", "q8_0", "q4_0"])
def test_quantized_exports(trained_run, tmp_path, ftype):
    out, _ = trained_run
    ref = run.load(export.export(out, tmp_path / "f32.gguf", "f32"))
    q = run.load(export.export(out, tmp_path / f"{ftype}.gguf", ftype))
    ids = ref.tokenize("The quick brown fox jumps over the lazy dog. It's 2024!")[:32]
    a, b = ref.logits(ids), q.logits(ids)
    agreement = (a.argmax(-1) == b.argmax(-1)).mean()
    assert agreement >= {"f16": 1.0, "bf16": 0.9, "q8_0": 0.95}.get(ftype, 0.6), agreement


def test_q4_k_export_holds_q4_k_matrices(trained_run, tmp_path):
    """A run whose matrices are 256 wide (K-quants need rows of whole 256-blocks): every such
    matrix is Q4_K in the file, the 704-wide ffn_down falls back to Q8_0, the Q4_K weights
    decode (gguf's reference decoder) to within a 4-bit step of the f32 file's, and the model
    picks the f32 model's next tokens."""
    import gguf
    out, _ = trained_run
    state = json.loads((train.checkpoints(out)[-1] / "state.json").read_text())
    config = ModelConfig.from_depth(5, state["model_config"]["vocab_size"], 64)
    assert (config.n_embd, config.n_ff) == (256, 704)
    torch.manual_seed(0)
    model = Transformer(config)
    run_dir = tmp_path / "wide"
    run_dir.mkdir()
    shutil.copy(out / "tokenizer.json", run_dir / "tokenizer.json")
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    train.save_checkpoint(run_dir, weights, {}, [], {**state, "model_config": config.to_dict()}, keep=1)
    f32 = run.load(export.export(run_dir, tmp_path / "f32.gguf", "f32"))
    q = run.load(export.export(run_dir, tmp_path / "q4_k.gguf", "q4_k"))
    types = {name: t.type_name for name, t in q.gguf.tensors.items() if len(t.shape) == 2}
    wide = [n for n in types if "ffn_down" not in n]
    assert len(wide) == 5 * 6 + 1 and all(types[n] == "Q4_K" for n in wide)  # 6 per layer + the embedding
    assert all(types[f"blk.{i}.ffn_down.weight"] == "Q8_0" for i in range(5))
    for name in wide:
        t = q.gguf.tensors[name]
        decoded = gguf.quants.dequantize(t.data.reshape(t.shape[0], -1), gguf.GGMLQuantizationType.Q4_K)
        exact = run.dequantize(f32.gguf.tensors[name].data.reshape(t.shape[0], -1), run.GGMLType.F32)
        blocks = exact.reshape(-1, 32)
        step = (blocks.max(-1) - np.minimum(blocks.min(-1), 0)) / 15  # one 4-bit step per 32-weight sub-block
        assert (np.abs(decoded - exact).reshape(-1, 32).max(-1) <= step + 0.02 * np.abs(blocks).max(-1)).all(), name
    ids = f32.tokenize("The quick brown fox jumps over the lazy dog. It's 2024!")[:64]
    agreement = (f32.logits(ids).argmax(-1) == q.logits(ids).argmax(-1)).mean()
    assert agreement >= 0.6, agreement


def test_q4_k_quantizer_against_gguf_reference_decoder():
    import gguf

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 512)) * rng.uniform(0.01, 1, (16, 1))).astype(np.float32)
    w[3] = 0.0
    raw = export.quantize_q4_k(w)
    assert raw.shape == (16, 2 * 144)
    decoded = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K)
    step = (w.reshape(16, -1, 32).max(-1) - np.minimum(w.reshape(16, -1, 32).min(-1), 0)) / 15
    err = np.abs(decoded - w).reshape(16, -1, 32).max(-1)
    assert (err <= 0.75 * step + 1e-6 + 0.02 * np.abs(w).reshape(16, -1, 32).max(-1)).all()
    assert np.array_equal(run.dequantize(raw, int(gguf.GGMLQuantizationType.Q4_K)), decoded)


def test_eval_gguf_matches_pytorch_bits_per_byte(trained_run, tmp_path):
    out, _ = trained_run
    path = export.export(out, tmp_path / "m.gguf", "f32")
    text = "The quick brown fox jumps over the lazy dog. " * 20
    r = export.evaluate_text(run.load(path), text)
    state, weights = exported(out)
    model = Transformer(ModelConfig(**state["model_config"]))
    model.load_state_dict(weights)
    ids = tokenizer.load(out / "tokenizer.json").encode(text, add_special_tokens=False).ids
    ids = [0] + ids
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 32):
            w = torch.tensor([ids[s:s + 33]])
            nats += model(w[:, :-1], w[:, 1:], reduction="sum")[1].item()
    assert r["bits_per_byte"] == pytest.approx(nats / len(text.encode()) / np.log(2), rel=1e-4)


# --- resume, processes, bad input (subprocesses) ------------------------------------------

TRAIN_SCRIPT = """
import sys, json
sys.path.insert(0, {root!r})
from twofile import train
cfg = train.TrainConfig(**json.loads(sys.argv[1]))
train.train(cfg, resume=sys.argv[2] == "resume", progress=False)
"""


def run_training(cfg: train.TrainConfig, resume=False, nproc=1, wait=True):
    code = TRAIN_SCRIPT.format(root=str(ROOT))
    args = [json.dumps(cfg.__dict__), "resume" if resume else "new"]
    if nproc > 1:
        script = Path(cfg.out).parent / "train_script.py"
        script.write_text(code)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), str(script), *args]
    else:
        cmd = [sys.executable, "-c", code, *args]
    return launch(cmd, wait)


def launch(cmd, wait):
    """Start a command: with wait, its stderr once it succeeded; else the running process."""
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    return stderr


def final_weights(out) -> dict:
    return train.load_checkpoint(train.checkpoints(Path(out))[-1])[1]


def test_sigkill_then_resume_is_bit_exact(tiny_data, tmp_path):
    straight = tiny_config(tiny_data, tmp_path / "straight")
    run_training(straight)
    killed = tiny_config(tiny_data, tmp_path / "killed")
    p = run_training(killed, wait=False)
    deadline = time.time() + 300
    while not any(c.name >= "ckpt_0000010" for c in train.checkpoints(Path(killed.out))):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert train.checkpoints(Path(killed.out))[-1].name < "ckpt_0000020"  # it really stopped early
    run_training(killed, resume=True)
    a, b = final_weights(straight.out), final_weights(killed.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer,tolerance", [("adamw", 1e-5), ("muon", 2e-4)])
def test_two_processes_equal_one(tiny_data, tmp_path, optimizer, tolerance):
    """DDP over 2 CPU processes (gloo) against 1 process with the same global batch. Muon's
    Newton-Schulz iterations amplify the float32 differences of summing gradients in
    another order, hence its looser tolerance."""
    one = tiny_config(tiny_data, tmp_path / "one", optimizer=optimizer)   # 2 accumulation steps
    two = tiny_config(tiny_data, tmp_path / "two", optimizer=optimizer)   # 2 ranks x 1
    run_training(one)
    run_training(two, nproc=2)

    def losses(out):
        return [json.loads(l)["loss"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(l)]

    assert len(losses(one.out)) == 20
    np.testing.assert_allclose(losses(two.out), losses(one.out), atol=tolerance, rtol=0)
    # a 2-process run resumes too: drop its last checkpoints and continue to the same end
    for ckpt in train.checkpoints(Path(two.out))[-2:]:
        shutil.rmtree(ckpt)
    run_training(two, resume=True, nproc=2)
    np.testing.assert_allclose(losses(two.out), losses(one.out), atol=tolerance, rtol=0)


def test_bad_input(tiny_data, tmp_path):
    with pytest.raises(FileNotFoundError):
        train.train(tiny_config(tmp_path / "missing", tmp_path / "o"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no manifest.json"):
        train.train(tiny_config(tmp_path / "empty", tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="not a multiple of micro_batch"):
        train.train(tiny_config(tiny_data, tmp_path / "o", batch_tokens=100), progress=False)
    with pytest.raises(ValueError, match=r"^--dropout 1.0 must be below 1 \(negative: planned\)$"):
        train.train(tiny_config(tiny_data, tmp_path / "o", dropout=1.0), progress=False)
    cfg = tiny_config(tiny_data, tmp_path / "o", max_steps=5)
    train.train(cfg, progress=False)
    with pytest.raises(ValueError, match="holds checkpoints"):
        train.train(cfg, progress=False)
    with pytest.raises(ValueError, match="was trained with depth = 2, not 3"):
        train.train(tiny_config(tiny_data, tmp_path / "o", max_steps=5, depth=3), resume=True, progress=False)
    # the first update (lr 1e12) is finite but ruins the weights: the second step's loss is NaN
    with pytest.raises(ValueError, match=r"^loss is nan at step 2: training diverged \(lower --lr\?\); the step was "
                                         r"not applied, the last good checkpoint is none$"):
        train.train(tiny_config(tiny_data, tmp_path / "nan", lr=1e12, grad_clip=0), progress=False)
    assert train.checkpoints(tmp_path / "nan") == []


class InfGradient(torch.autograd.Function):
    """The identity forward; backward multiplies the gradient by inf: a finite loss whose
    gradient explodes."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_exploding_gradient_after_a_checkpoint_is_not_applied(tiny_data, tmp_path, monkeypatch, grad_clip):
    """The loss stays finite; from the 10th step (a checkpoint step) on, the gradient is
    inf. The update must not be applied, nor checkpointed: the newest checkpoint stays the
    one of step 5, bit for bit, and every checkpoint has finite weights."""
    out = tmp_path / "o"
    forwards, before = [], {}  # training forwards so far; the newest checkpoint as the bad step began

    class Exploding(Transformer):
        def forward(self, idx, targets=None, reduction="mean"):
            result = super().forward(idx, targets, reduction)
            if targets is None or not self.training:
                return result
            forwards.append(1)
            if len(forwards) <= 2 * 9:  # 2 micro-batches a step: steps 1 to 9 are healthy
                return result
            if not before:
                before.update(final_weights(out))
            logits, loss = result
            return logits, InfGradient.apply(loss)

    monkeypatch.setattr(train, "Transformer", Exploding)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match=r"^gradient norm is (inf|nan) at step 10: training diverged \(lower --lr\?\); "
                                         r"the step was not applied, the last good checkpoint is .*ckpt_0000005$"):
        train.train(tiny_config(tiny_data, out, grad_clip=grad_clip), progress=False)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored on raise
    saved = train.checkpoints(out)
    assert [p.name for p in saved] == ["ckpt_0000005"]
    assert all(torch.isfinite(v).all() for p in saved for v in train.load_checkpoint(p)[1].values())
    after = final_weights(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_disk_full_during_checkpoint_keeps_the_last_good_one(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "o"
    train.train(tiny_config(tiny_data, out, max_steps=5), progress=False)
    good = train.checkpoints(out)[-1]
    import safetensors.torch

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    state, weights, _ = train.load_checkpoint(good)
    model = Transformer(ModelConfig(**state["model_config"]))
    with pytest.raises(OSError, match="No space left"):
        gathered = train.gather_state(model, [torch.optim.AdamW(model.parameters())])
        train.save_checkpoint(out, *gathered, {**state, "step": 6}, keep=2)
    assert train.checkpoints(out)[-1] == good and not list(out.glob(".tmp_*"))
    assert train.load_checkpoint(good)[0]["step"] == 5


SIGNAL_IN_STEP = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch
from twofile import train
real_step, calls = torch.optim.AdamW.step, []

def step(self, *args, **kwargs):  # with Muon: after Muon has updated the hidden matrices
    calls.append(1)
    if len(calls) == {at_call}:
        for signum in {signums}:
            os.kill(os.getpid(), signum)
    return real_step(self, *args, **kwargs)

torch.optim.AdamW.step = step
try:
    train.train(train.TrainConfig(**json.loads(sys.argv[1])), progress=False)
except KeyboardInterrupt:
    sys.exit(130)
"""


def signal_inside_step(cfg: train.TrainConfig, at_call: int, *signums) -> str:
    """Train in a child process that signals itself as AdamW's step begins (with Muon, the
    second half of an optimizer step); return its stderr. A child, as for the straight run:
    in one process, earlier forward passes can change later float results in the last bit."""
    code = SIGNAL_IN_STEP.format(root=str(ROOT), at_call=at_call, signums=[int(s) for s in signums])
    r = subprocess.run([sys.executable, "-c", code, json.dumps(cfg.__dict__)], env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 130, r.stderr[-3000:]
    return r.stderr


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory):
    """tiny_config's run, uninterrupted, in a child process."""
    cfg = tiny_config(tiny_data, tmp_path_factory.mktemp("straight") / "s")
    run_training(cfg)
    return Path(cfg.out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_an_optimizer_step_waits_for_its_end(straight_run, tiny_data, tmp_path, signum):
    """SIGINT or SIGTERM in the middle of step 7: the step is finished and checkpointed as
    step 7, and the resumed run ends with the weights of the uninterrupted one, bit for bit
    (a checkpoint of a half-applied step would apply Muon's part twice)."""
    cfg = tiny_config(tiny_data, tmp_path / "o")
    stderr = signal_inside_step(cfg, 7, signum)
    assert "interrupted at step 7: checkpoint saved" in stderr
    assert [p.name for p in train.checkpoints(cfg.out)] == ["ckpt_0000005", "ckpt_0000007"]
    run_training(cfg, resume=True)
    a, b = final_weights(straight_run), final_weights(cfg.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_stops_at_once(straight_run, tiny_data, tmp_path):
    """Two SIGINTs inside step 7: no step is finished or saved; the checkpoint of step 5
    stays the newest, the same as the uninterrupted run's."""
    cfg = tiny_config(tiny_data, tmp_path / "o")
    assert "interrupted at step" not in signal_inside_step(cfg, 7, signal.SIGINT, signal.SIGINT)
    assert [p.name for p in train.checkpoints(cfg.out)] == ["ckpt_0000005"] and not list(Path(cfg.out).glob(".tmp_*"))
    a = train.load_checkpoint(straight_run / "ckpt_0000005")[1]
    b = final_weights(cfg.out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def cli_train(data_dir, out, *flags, resume=False, wait=True):
    """`python -m twofile train` as a user runs it: its stderr, or with wait=False the process."""
    args = ["--resume", str(out)] if resume else ["--data", str(data_dir), "--out", str(out), "--no-compile", *flags]
    return launch([sys.executable, "-m", "twofile", "train", *args], wait)


def test_ctrl_c_stops_at_a_step_boundary_and_resumes_bit_exact(tiny_data, tmp_path):
    """SIGINT mid-run through the real CLI: exit status 130, a checkpoint of the last whole
    step, and a resumed run ends with the weights of an uninterrupted run, bit for bit."""
    flags = ["--depth", "2", "--context", "32", "--batch-tokens", "256", "--micro-batch", "8", "--steps", "40",
             "--warmup-steps", "4", "--eval-every", "20", "--checkpoint-every", "1000", "--seed", "3"]
    cli_train(tiny_data, tmp_path / "straight", *flags)
    out = tmp_path / "stopped"
    p = cli_train(tiny_data, out, *flags, wait=False)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.time() < deadline and p.poll() is None, "the run ended before the signal could be sent"
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 130, stderr[-3000:]
    saved = train.checkpoints(out)
    assert len(saved) == 1, saved
    step = json.loads((saved[0] / "state.json").read_text())["step"]
    assert 2 <= step < 40, step
    assert f"interrupted at step {step}: checkpoint saved in {out}; --resume {out} continues" in stderr
    logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == step  # the saved step is the last one done
    cli_train(tiny_data, out, resume=True)
    a, b = final_weights(tmp_path / "straight"), final_weights(out)
    assert train.load_checkpoint(train.checkpoints(out)[-1])[0]["step"] == 40
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp2_two_processes_equal_one(tiny_data, tmp_path):
    """FSDP2 (fully_shard) over 2 CPU processes: the same losses as 1 process, and a resume
    from its gathered checkpoint reaches the same end."""
    # float32: the tolerance is for the order of sums; bfloat16 rounds each rank's shards apart
    one = tiny_config(tiny_data, tmp_path / "one", max_steps=10, optimizer="adamw", precision="float32")
    sharded = tiny_config(tiny_data, tmp_path / "fsdp", max_steps=10, fsdp=True, optimizer="adamw",
                          precision="float32")
    run_training(one)
    run_training(sharded, nproc=2)

    def losses(out):
        return [json.loads(l)["loss"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(l)]

    np.testing.assert_allclose(losses(sharded.out), losses(one.out), atol=1e-5, rtol=0)
    shutil.rmtree(train.checkpoints(Path(sharded.out))[-1])  # back to step 5
    run_training(sharded, resume=True, nproc=2)
    np.testing.assert_allclose(losses(sharded.out), losses(one.out), atol=1e-5, rtol=0)
    a, b = final_weights(one.out), final_weights(sharded.out)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
