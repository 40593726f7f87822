"""--device, --dtype and --threads: validated before loading, recorded when they change results."""
import json

import pytest
import torch

from circuitsearch.cli import main
from circuitsearch.config import PruneConfig
from circuitsearch.engine import choose_threads
from circuitsearch.models import build_test_model


def score(capsys, *extra):
    assert main(["score", "--model", "test:tiny-llama", "--task", "induction", *extra]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_dtypes_score_alike(capsys):
    before = torch.get_num_threads()
    try:
        base = score(capsys)
        wide = score(capsys, "--dtype", "float64")
        half = score(capsys, "--dtype", "bfloat16", "--threads", "2")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert abs(wide["full"] - base["full"]) < 1e-5 * max(1, abs(base["full"]))
    assert abs(half["full"] - base["full"]) < 5e-2 * max(1, abs(base["full"]))
    assert wide["full"] != base["full"] or half["full"] != base["full"]  # really another dtype


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda:3"], "no CUDA device"),
    (["--device", "toaster"], "is not a device"),
    (["--threads", "0"], "--threads 0 must be"),
])
def test_bad_engine_flags_are_named(args, message, capsys):
    assert main(["score", "--model", "test:tiny-llama", "--task", "induction", *args]) == 2
    assert message in capsys.readouterr().err


def test_settings_record_dtype_and_device_only_when_changed():
    assert not {"device", "dtype", "threads"} & set(PruneConfig().to_json())  # old run directories still match
    assert PruneConfig(dtype="bfloat16", threads=3).to_json()["dtype"] == "bfloat16"
    assert "threads" not in PruneConfig(threads=3).to_json()


def test_default_threads_rule():
    before = torch.get_num_threads()
    try:
        assert choose_threads(build_test_model("tiny-gpt")) == 1 == torch.get_num_threads()
        assert choose_threads(build_test_model("tiny-gpt"), 2) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
