"""TransCLIP (--transductive transclip): reads no test label, tends to its input as the KL weight grows, agrees
with a direct computation of its updates, and replaces the test predictions of a feature-space method."""

import json

import pytest
import torch
import torch.nn.functional as F

import main
from methods.transductive import _graph_term, neighbour_graph, transclip


@pytest.fixture(scope="module")
def problem():
    """Three separated clusters in 256 dimensions (TransCLIP's likelihood scale assumes CLIP-like widths) with
    noisy input predictions: a third of them point at the wrong class."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 256, generator=g), dim=-1) * 10
    y = torch.arange(3).repeat_interleave(40)
    x = centres[y] + torch.randn(len(y), 256, generator=g)
    noisy = y.clone()
    wrong = torch.arange(len(y)) % 3 == 0
    noisy[wrong] = (y[wrong] + 1) % 3
    probs = (F.one_hot(noisy, 3) * 1.5 + 0.3 * torch.rand(len(y), 3, generator=g)).softmax(1)
    return x, y, probs


def test_transclip_reads_no_test_label_and_fixes_noisy_predictions(problem):
    x, y, probs = problem
    z = transclip(x, probs)
    assert torch.allclose(z.sum(1), torch.ones(len(y)), atol=1e-5)
    before = (probs.argmax(1) == y).float().mean()
    after = (z.argmax(1) == y).float().mean()
    assert before < 0.7 and after > 0.95  # the mixture and the neighbour graph override the wrong third
    # a permutation of the rows permutes the answer: nothing depends on labels or on the order
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(transclip(x[perm], probs[perm]), z[perm], atol=1e-5)


def test_transclip_returns_its_input_as_the_kl_weight_tends_to_infinity(problem):
    x, _, probs = problem
    far = [(transclip(x, probs, kl_weight=w) - probs).abs().max().item() for w in (1.0, 1e2, 1e4, 1e8)]
    assert far[0] > 0.3 and far == sorted(far, reverse=True) and far[-1] < 1e-5


def test_neighbour_graph_is_the_dense_one_in_blocks(problem):
    x, _, _ = problem
    f = F.normalize(x, dim=-1)
    idx, val = neighbour_graph(f, 3)
    dense = f @ f.t()
    dense.fill_diagonal_(-float("inf"))
    ref_val, ref_idx = dense.topk(3, dim=1)
    assert torch.equal(idx, ref_idx) and torch.allclose(val, ref_val)
    w = torch.zeros(len(f), len(f))
    w.scatter_(1, idx, val)
    z = torch.rand(len(f), 3)
    assert torch.allclose(_graph_term(z, idx, val), w @ z + w.t() @ z, atol=1e-5)


def test_transclip_replaces_the_test_predictions_of_a_method_and_reads_no_test_label(folder_root, tmp_path):
    tiny = ["--model_name", "tiny_clip", "--device", "cpu", "--num_workers", "0", "--batch_size", "8",
            "--root_path", str(folder_root), "--dataset", "folder", "--shots", "2", "--n_iters", "1",
            "--warmup_steps", "2"]
    results = {}
    for mode in ("none", "transclip"):
        out = tmp_path / mode
        assert main.main(["--method", "linear", "--transductive", mode, "--output_dir", str(out), *tiny]) == 0
        (found,) = out.rglob("results.json")
        rows = (found.parent / "predictions.csv").read_text().splitlines()[1:]
        results[mode] = (json.loads(found.read_text()), rows)
    plain, refined = results["none"], results["transclip"]

    def probs(rows, part):
        return torch.tensor([[float(v) for v in r.split(",")[4:]] for r in rows if r.startswith(part + ",")])

    # validation keeps the classifier's own predictions; the test ones change
    assert torch.allclose(probs(plain[1], "val"), probs(refined[1], "val"), atol=1e-5)
    assert not torch.allclose(probs(plain[1], "test"), probs(refined[1], "test"), atol=1e-2)
    assert refined[0]["method_settings"]["transductive"] == "transclip"
    # --eval_only reloads the head and applies TransCLIP again: the same metrics
    folder = next((tmp_path / "transclip").rglob("results.json")).parent
    args = ["--method", "linear", "--transductive", "transclip", "--output_dir", str(tmp_path / "transclip"), *tiny]
    assert main.main([*args, "--eval_only", "--run", str(folder)]) == 0
    again = json.loads((folder / "eval_results.json").read_text())
    assert again["metrics"]["test"] == refined[0]["metrics"]["test"]
