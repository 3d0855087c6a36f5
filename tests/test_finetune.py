"""Finetuning (issue 15): GGUF files in PyTorch, conversations into masked training rows,
the finetune command, LoRA, export back to GGUF.

The oracles: transformers running the same tiny models (each family run.py runs, written to
GGUF as llama.cpp's converter writes them) and run.py running the same file."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import bpe_metadata, tiny_llama, write_llama_gguf
from test_architectures import FAMILIES, hf_logits, longrope
from twofile import finetune, run
from twofile.model import load_gguf


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


@pytest.mark.parametrize("qtype", [None, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_K])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gguf_into_pytorch_matches_transformers_and_run_py(tmp_path, bpe_tokenizer, name, qtype):
    """Every family, F32 and quantized: the PyTorch model load_gguf builds gives
    transformers' logits (the model the file holds) and run.py's within 1e-4 of their scale,
    over 40 positions (Gemma's windows of 8 included); the config says what the file says."""
    options = dict(FAMILIES[name])
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # rows of 256 weights
        options.update(head_dim=64, **({"config": longrope(32)} if name == "phi3-longrope" else {}))
        model = tiny_llama(tie=False, hidden=256, ff=512, n_head=4, n_head_kv=2, **options)
    else:
        model = tiny_llama(tie=qtype is None, hidden=96, ff=128, n_head=4, n_head_kv=2, **options)
    path = str(write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"), qtype))
    ids = [int(i) for i in np.random.default_rng(5).integers(0, 320, 40)]
    ours, metadata = load_gguf(path)
    ours.eval()
    c = ours.config
    assert c.arch == {"mistral": "llama", "phi3-longrope": "phi3"}.get(name, name)
    assert c.tie_embeddings == (qtype is None) and c.context == 128
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    oracle = hf_logits(model, ids)
    scale = max(1.0, np.abs(oracle).max())
    assert np.abs(torch_logits(ours, ids) - oracle).max() <= 1e-4 * scale
    m = run.load(path)
    m.use_numba = False
    assert np.abs(torch_logits(ours, ids) - m.logits(ids)).max() <= 1e-4 * scale


def test_longrope_factors_follow_the_context_in_pytorch(tmp_path, bpe_tokenizer):
    """As run.py: a context of 32 (the original) takes the short factors, a longer one the long."""
    model = tiny_llama(tie=False, hidden=96, ff=128, n_head=4, n_head_kv=2, **FAMILIES["phi3-longrope"])
    path = str(write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2")))
    ids = [int(i) for i in np.random.default_rng(4).integers(0, 320, 32)]
    short, long = load_gguf(path, n_ctx=32)[0].eval(), load_gguf(path)[0].eval()
    assert short.config.rope_factors != long.config.rope_factors
    oracle = hf_logits(model, ids)  # 32 tokens: transformers takes the short factors
    scale = max(1.0, np.abs(oracle).max())
    assert np.abs(torch_logits(short, ids) - oracle).max() <= 1e-4 * scale
    assert np.abs(torch_logits(long, ids) - run.load(path).logits(ids)).max() <= 1e-4 * scale


def test_smollm2_in_pytorch_matches_run_py(smollm2_path):
    """The default model (Q4_1, tied embeddings, a llama file): PyTorch on its decoded weights
    against run.py's numpy path on the same file."""
    ours, metadata = load_gguf(smollm2_path, n_ctx=256)
    assert ours.config.tie_embeddings and ours.config.context == 256 and "tokenizer.chat_template" in metadata
    m = run.load(smollm2_path)
    m.use_numba = False
    ids = m.chat_tokens([{"role": "user", "content": "What is the capital of France?"}])
    theirs = m.logits(ids)
    assert np.abs(torch_logits(ours.eval(), ids) - theirs).max() <= 1e-4 * np.abs(theirs).max()


# --- conversations: records, masks, truncation -------------------------------------------


def test_records_of_jsonl_and_of_a_cut_off_json_array(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    share = {"id": "x", "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "a?"},
                                          {"from": "gpt", "value": "b."}, {"from": "human", "value": "unanswered"}]}
    lines = tmp_path / "c.jsonl"
    lines.write_text("\n".join([json.dumps(good), "{not json", "", json.dumps(share)]) + "\n")
    assert [(w, r is None) for w, r in finetune.read_records(str(lines))] == \
        [("line 1", False), ("line 2", True), ("line 4", False)]
    array = tmp_path / "c.json"
    text = json.dumps([good, share, good])
    array.write_text(text[:-20])  # cut inside the third record
    records = list(finetune.read_records(str(array)))
    assert [w for w, _ in records] == ["record 1", "record 2", "record 3"] and records[2][1] == "cut off"
    assert finetune.messages_of(records[1][1]) == ([{"role": "system", "content": "be brief"},
                                                    {"role": "user", "content": "a?"},
                                                    {"role": "assistant", "content": "b."}], "")


@pytest.mark.parametrize("record,reason", [
    ({"messages": []}, "no messages or conversations list"),
    ({"text": "hi"}, "no messages or conversations list"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}, "an empty turn"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "roles out of turn"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                        {"from": "gpt", "value": "c"}]}, "roles out of turn"),
    ([1, 2], "not a JSON object"),
])
def test_bad_records_are_skipped_with_a_reason(record, reason):
    messages, why = finetune.messages_of(record)
    assert messages is None and why.startswith(reason)


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        finetune.load_conversations(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no usable conversation .*the file is empty"):
        finetune.load_conversations(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}]}\nnonsense\n')
    with pytest.raises(ValueError, match=r"1 skipped: no assistant turn \(first at line 1\); "
                                         r"1 skipped: not JSON \(first at line 2\)"):
        finetune.load_conversations(str(bad))


CONVERSATION = [{"role": "system", "content": "You answer in one line."},
                {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "And <|im_end|> 3 + 3?"},  # a special token's text in a message: text
                {"role": "assistant", "content": "6, with <|im_start|> as text."}]


def test_only_the_assistants_tokens_are_targets_chatml(smollm2_path):
    """SmolLM2's ChatML: the marked tokens are exactly each reply followed by <|im_end|> and a
    newline, tokenized by themselves (hand-built oracle; the replies contain special tokens'
    texts, which stay text); everything else is the prompt."""
    m = run.load(str(smollm2_path))
    tok, meta = m.tokenizer, m.metadata
    ids, mask, cut = finetune.encode(tok, meta, CONVERSATION, 1024)
    assert not cut and ids.tolist() == m.chat_tokens(CONVERSATION, add_generation_prompt=False)
    im_end = tok.tokens.index("<|im_end|>")
    expected = []
    for reply in ("It is 4.", "6, with <|im_start|> as text."):
        expected += tok.encode(reply, add_bos=False, parse_special=False) + [im_end] + \
            tok.encode("\n", add_bos=False, parse_special=False)
    assert ids[mask].tolist() == expected
    spans = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    assert len(spans) == 4  # two runs of assistant tokens
    batch = finetune.micro_batch([[(ids, mask, cut)], [(ids[:5], mask[:5], True)]], pad=7)
    x, y, rows = batch["idx"], batch["targets"], batch["rows"]
    assert x.shape == (2, len(ids) - 1) and (x[1, 4:] == 7).all() and "positions" not in batch  # padded at the end
    assert len(y) == len(rows) == mask[1:].sum() == len(expected)
    assert torch.equal(y, torch.tensor(ids[1:][mask[1:]])) and torch.equal(x[0, rows[:-1] + 1], y[:-1])


def test_only_the_assistants_tokens_are_targets_gemma():
    """Gemma 3 base has no template: its family's, the model's turn tokens; the marked tokens
    are each reply, <end_of_turn> and a newline; a system message joins the first user turn."""
    from twofile import assets

    path = str(assets.fetch(assets.GEMMA3))
    g = run.read_gguf(path)
    tok = run.Tokenizer(g.metadata, path)
    meta = {**g.metadata, "tokenizer.chat_template": finetune.chat_template(g.metadata, path)}
    assert meta["tokenizer.chat_template"] == finetune.GEMMA_TEMPLATE
    ids, mask, _ = finetune.encode(tok, meta, CONVERSATION[:3], 1024)
    text = tok.decode(ids.tolist())
    assert text == ("<bos><start_of_turn>user\nYou answer in one line.\n\nWhat is 2 + 2?<end_of_turn>\n"
                    "<start_of_turn>model\nIt is 4.<end_of_turn>\n")
    eot = tok.tokens.index("<end_of_turn>")
    assert ids[mask].tolist() == tok.encode("It is 4.", add_bos=False, parse_special=False) + [eot] + \
        tok.encode("\n", add_bos=False, parse_special=False)
    assert eot in tok.eog_ids  # run.py stops there


def test_long_conversations_are_cut_at_a_turn_boundary(smollm2_path):
    m = run.load(str(smollm2_path))
    tok, meta = m.tokenizer, m.metadata
    full, _, _ = finetune.encode(tok, meta, CONVERSATION, 1024)
    first = len(m.chat_tokens(CONVERSATION[:3], add_generation_prompt=False))
    ids, mask, cut = finetune.encode(tok, meta, CONVERSATION, len(full) - 2)  # the second reply does not fit
    assert cut and ids.tolist() == full[:first].tolist() and mask[-1]
    assert finetune.encode(tok, meta, CONVERSATION, len(full) - 1)[2] is False  # context + 1 tokens fit exactly
    assert finetune.encode(tok, meta, CONVERSATION, first - 2) is None  # not even the first reply


# --- the run: LoRA, resume, export --------------------------------------------------------

@pytest.fixture
def chats(tmp_path):
    """20 short conversations (the held-out one is the last) in a jsonl file."""
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and then it ran to see the dog who was very happy".split()
    path = tmp_path / "chats.jsonl"
    with open(path, "w") as f:
        for i in range(20):
            turns = []
            for _ in range(int(rng.integers(1, 3))):
                turns += [{"role": "user", "content": " ".join(rng.choice(words, int(rng.integers(2, 6))))},
                          {"role": "assistant", "content": "yes, " + " ".join(rng.choice(words, 3))}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return str(path)


def tiny_run(tiny_gguf, chats, out, **kw) -> finetune.FinetuneConfig:
    base = dict(model=str(tiny_gguf[0]), data=chats, out=str(out), context=64, batch_size=4, micro_batch=2,
                max_steps=4, eval_every=2, checkpoint_every=2, keep_checkpoints=5, warmup_steps=2, lr=1e-2)
    return finetune.FinetuneConfig(**{**base, **kw})


@pytest.mark.parametrize("lora", [0, 4])
def test_resume_is_bit_exact(tiny_gguf, chats, tmp_path, lora):
    """A run stopped after its step-2 checkpoint and resumed ends with the straight run's
    weights and optimizer state, bit for bit (data and LoRA's initialization from the seed)."""
    import shutil

    from twofile import train

    straight = tiny_run(tiny_gguf, chats, tmp_path / "straight", lora=lora)
    finetune.finetune(straight, progress=False)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(tmp_path / "straight" / "ckpt_0000002", stopped / "ckpt_0000002")
    shutil.copy(tmp_path / "straight" / "source.gguf", stopped / "source.gguf")
    finetune.finetune(tiny_run(tiny_gguf, chats, stopped, lora=lora), resume=True, progress=False)
    (_, a, oa), (_, b, ob) = [train.load_checkpoint(train.checkpoints(d)[-1]) for d in (straight.out, stopped)]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert oa.keys() == ob.keys() and [k for k in oa if not torch.equal(oa[k], ob[k])] == []
    if lora:  # the checkpoint holds the adapters only
        assert all("lora_" in k for k in a)
    with pytest.raises(ValueError, match="was finetuned with lr = 0.01, not 0.02"):
        finetune.finetune(tiny_run(tiny_gguf, chats, stopped, lora=lora, lr=0.02), resume=True, progress=False)


def test_lora_merge_equals_the_adapters_output(tiny_gguf):
    model = finetune.with_lora(load_gguf(str(tiny_gguf[0]))[0], 4).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: give the adapters something to say
                p.normal_(0, 0.5)
    ids = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        unmerged = model(ids)
        merged = model.merge_and_unload()(ids)
    assert (unmerged - load_gguf(str(tiny_gguf[0]))[0].eval()(ids)).abs().max() > 0.1  # the adapters matter
    assert (unmerged - merged).abs().max() <= 1e-4 * unmerged.abs().max()


def test_finetune_learns_and_exports_for_run_py_and_transformers(tiny_gguf, chats, tmp_path):
    """A LoRA finetune lowers the held-out assistant loss; its exported file gives the trained
    (unmerged) model's logits in run.py and in transformers, and keeps the source's tokenizer
    and chat template."""
    from conftest import hf_gguf
    from safetensors.torch import load_file

    from twofile import export

    cfg = tiny_run(tiny_gguf, chats, tmp_path / "sft", lora=8, max_steps=30, eval_every=10, checkpoint_every=30)
    finetune.finetune(cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert vals[-1] < 0.9 * vals[0]  # (the replies' random words keep much of it)
    path = export.export(cfg.out, tmp_path / "sft" / "sft.gguf", "f32")
    trained = finetune.with_lora(load_gguf(str(tiny_gguf[0]))[0], 8)
    trained.load_state_dict(load_file(str(export.chosen_checkpoint(cfg.out) / "model.safetensors")), strict=False)
    ids = run.load(str(path)).chat_tokens([{"role": "user", "content": "the cat sat"}])
    expected = torch_logits(trained.eval(), ids)
    m = run.load(str(path))
    m.use_numba = False
    scale = np.abs(expected).max()
    assert np.abs(m.logits(ids) - expected).max() <= 1e-4 * scale
    _, hf = hf_gguf(path)
    assert np.abs(hf_logits(hf, ids) - expected).max() <= 1e-4 * scale
    source = run.read_gguf(str(tiny_gguf[0])).metadata
    assert all(m.metadata[k] == source[k] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                    "tokenizer.chat_template"))


def test_the_loss_on_chosen_rows_equals_the_masked_loss(tiny_gguf):
    """forward(rows=...) projects only those positions: the same sum as the full logits'
    cross-entropy with the other targets at -100."""
    model = load_gguf(str(tiny_gguf[0]))[0].eval()
    x = torch.randint(0, 320, (3, 17))
    y = torch.randint(0, 320, (3, 17))
    y[torch.rand(3, 17) < 0.6] = -100
    rows = torch.nonzero(y.reshape(-1) != -100).flatten()
    with torch.no_grad():
        full = model(x, y, reduction="sum")[1]
        chosen = model(x, y.reshape(-1)[rows], reduction="sum", rows=rows)[1]
    assert 0 < len(rows) < 40 and torch.allclose(full, chosen, rtol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gemma3", "gemma2"])
def test_packed_conversations_give_each_ones_own_loss(tmp_path, bpe_tokenizer, name):
    """Conversations packed into rows (first-fit decreasing, at most the context each) give the
    loss, and the gradients, of each conversation run by itself: RoPE restarts, attention
    stays within each (Gemma's windows of 8 and soft caps too)."""
    options = {} if name == "llama" else FAMILIES[name]
    path = str(write_llama_gguf(tmp_path / "m.gguf", tiny_llama(tie=False, hidden=96, ff=128, n_head=4, n_head_kv=2,
                                                                **options), bpe_metadata(bpe_tokenizer, "gpt-2")))
    model = load_gguf(path, n_ctx=48)[0]
    rng = np.random.default_rng(1)
    conversations = [(rng.integers(0, 320, n), rng.random(n) < 0.5, False) for n in rng.integers(3, 40, 9)]
    rows = finetune.pack(conversations, 48)
    assert sorted(id(c) for row in rows for c in row) == sorted(id(c) for c in conversations)
    assert all(sum(len(c[0]) - 1 for c in row) <= 48 for row in rows) and len(rows) < 9 and max(map(len, rows)) > 2

    def loss_and_grads(batches):
        model.zero_grad()
        total = sum(model(**b, reduction="sum")[1] for b in batches)
        total.backward()
        return total.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    packed, alone = loss_and_grads([finetune.micro_batch(rows, pad=0)]), \
        loss_and_grads([finetune.micro_batch([[c]], pad=0) for c in conversations])
    assert abs(packed[0] - alone[0]) <= 1e-5 * alone[0]
    assert (packed[1] - alone[1]).abs().max() <= 1e-4 * alone[1].abs().max()


def test_finetune_command_on_our_own_pretrained_run(tmp_path, chats, capsys):
    """`twofile finetune RUN_DIR`: a run of `twofile train` (its tokenizer has ChatML's tokens,
    its file ChatML's template), finetuned and exported through the command line; run.py then
    chats with the result, stopping at <|im_end|>."""
    from conftest import SAMPLE_TEXT, varied_strings

    from twofile import cli, data, tokenizer, train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(SAMPLE_TEXT * 3 + "\n".join(varied_strings(100, seed=1)))
    tok = tokenizer.train([SAMPLE_TEXT] * 3, 300, show_progress=False)
    tokenizer.save(tok, tmp_path / "tok.json")
    data.prepare([str(corpus)], str(tmp_path / "tok.json"), str(tmp_path / "data"), val_fraction=0.2, progress=False)
    train.train(train.TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "pre"), depth=1, context=64,
                                  batch_tokens=512, micro_batch=8, max_steps=5, eval_every=5, compile=False),
                progress=False)
    assert cli.main(["finetune", str(tmp_path / "pre"), "--data", chats, "--out", str(tmp_path / "sft"),
                     "--context", "64", "--steps", "3", "--batch-size", "4", "--micro-batch", "2"]) == 0
    assert "held-out loss per assistant token" in capsys.readouterr().err
    m = run.load(str(tmp_path / "sft" / "model.gguf"))
    assert m.metadata["tokenizer.chat_template"] == tokenizer.CHATML_TEMPLATE
    assert m.tokenizer.tokens.index("<|im_end|>") in m.tokenizer.eog_ids
    g = m.session().generate(m.chat_tokens([{"role": "user", "content": "the cat"}]), 8, temperature=0)
    assert "".join(g) == g.text and g.finish_reason in ("eos", "length")
    # bad input: one line, non-zero exit, nothing written
    assert cli.main(["finetune", str(tmp_path / "pre"), "--data", str(tmp_path / "none.jsonl"),
                     "--out", str(tmp_path / "bad"), "--steps", "1", "--context", "64"]) != 0
    assert "none.jsonl: no such file" in capsys.readouterr().err and not (tmp_path / "bad" / "ckpt_0000001").exists()


@pytest.mark.parametrize("lora,fsdp", [(0, False), (4, False), (4, True)])
def test_two_processes_equal_one(tiny_gguf, chats, tmp_path, lora, fsdp):
    """torchrun over 2 CPU processes (gloo), DDP or FSDP2, against 1 process: the same
    conversations per step (each rank takes every other micro-batch), the same losses and
    weights."""
    import os
    import subprocess
    import sys

    from twofile import train

    script = tmp_path / "ft.py"
    script.write_text("import sys, json\nfrom twofile import finetune\n"
                      "finetune.finetune(finetune.FinetuneConfig(**json.loads(sys.argv[1])), progress=False)\n")
    results = {}
    for nproc in (1, 2):
        cfg = tiny_run(tiny_gguf, chats, tmp_path / f"n{nproc}", lora=lora, max_steps=4, fsdp=fsdp and nproc > 1)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29600 + os.getpid() % 1000), str(script), json.dumps(cfg.__dict__)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])})
        assert p.returncode == 0, p.stderr[-3000:]
        log = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
        results[nproc] = ([r["loss"] for r in log if "loss" in r], train.load_checkpoint(train.checkpoints(cfg.out)[-1])[1])
    assert len(results[1][0]) == 4
    np.testing.assert_allclose(results[2][0], results[1][0], rtol=1e-5)
    for k, w in results[1][1].items():
        np.testing.assert_allclose(results[2][1][k].numpy(), w.numpy(), atol=1e-5)
