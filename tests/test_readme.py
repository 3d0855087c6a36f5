"""The README's Python examples, run as written against a tiny model (the oracle: they run,
print what they say, and use nothing the API does not have)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_examples_run(tmp_path, bpe_tokenizer, capsys):
    from conftest import bpe_metadata, tiny_llama, write_llama_gguf

    path = write_llama_gguf(tmp_path / "m.gguf", tiny_llama(tie=True, ctx=1024), bpe_metadata(bpe_tokenizer, "gpt-2"))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 2
    namespace = {}
    for code in blocks:  # in order, sharing one namespace, as a reader would paste them
        exec(compile(code.replace('"MODEL.gguf"', repr(str(path))), "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert out.count("tokens]") == 2 and " Paris " in out and " a cheese " in out
    assert namespace["gen"].finish_reason in ("eos", "stop", "length", "context")
