"""Time the official IRCAN attribution script on the rows the attribution bench times.

``ircan bench attribution --official DIR`` runs ``DIR/src/1_calculate_attribution_completion.py``
(the paper's repository, github.com/danshi777/IRCAN; not part of this project) with the paper's
settings on CPU (``--no_cuda --batch_size 20 --batch_size_per_inference 2``: m = 20 points, two
per forward-backward pass, every layer) on the same model folder and rows, written in its MemoTrap
JSONL layout, in its own interpreter. Its own timer (after the model is loaded) over the rows is
its time per example. It needs the ``jsonlines`` package where it runs. Its scores are not
compared: it takes the gradient at the left Riemann points weighted by alpha and tokenizes the
answer alone, so only its time is.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import IrcanError

SCRIPT = Path("src") / "1_calculate_attribution_completion.py"


def _memotrap_rows(tokenizer: Any, source: str) -> list[dict[str, Any]]:
    """The bench's rows in MemoTrap's layout (prompt, classes, answer_index)."""
    from .rows import bench_examples, file_and_rows

    path, k = file_and_rows(source)
    if not source.startswith("len:") and Path(path).suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()][:k]
        if all("classes" in row for row in lines):
            return lines  # a MemoTrap file: its rows as they are
    return [{"prompt": e.prompt, "classes": str([e.answer, e.memorized]), "answer_index": 0}
            for e in bench_examples(tokenizer, source)]


def official_worker(root: str, model_spec: str, source: str) -> tuple[Any, ...]:
    """(nan, seconds per example, nan, [], None) of the official script on ``source``'s rows."""
    from transformers import AutoTokenizer

    from ..models import resolve_model

    script = Path(root) / SCRIPT
    if not script.is_file():
        raise IrcanError(f"--official {root}: no {SCRIPT} there (pass the root of the IRCAN repository)")
    folder = resolve_model(model_spec)
    rows = _memotrap_rows(AutoTokenizer.from_pretrained(folder), source)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cmd = [sys.executable, str(SCRIPT), "--model_path", folder, "--data_path", str(data), "--output_dir", tmp,
               "--model_name", "bench", "--dataset_name", "bench", "--no_cuda", "--batch_size", "20",
               "--batch_size_per_inference", "2"]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    found = re.findall(r"Costing time: ([0-9.]+) seconds", proc.stdout + proc.stderr)
    if proc.returncode or not found:
        raise IrcanError(f"the official script in {root} failed (it needs the jsonlines package):\n"
                         f"{(proc.stderr or proc.stdout)[-2000:]}")
    return float("nan"), float(found[-1]) / len(rows), float("nan"), [], None
