import pytest
import torch

from raftune.similarity import SemanticFilter, cosine_rows, passes


def test_cosine_rows_matches_naive():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    naive = [float(a[i] @ b[i] / (a[i].norm() * b[i].norm())) for i in range(5)]
    assert cosine_rows(a, b).tolist() == pytest.approx(naive, abs=1e-6)


def test_cosine_rows_limits():
    a = torch.tensor([[1.0, 2.0], [1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[2.0, 4.0], [-3.0, 0.0], [1.0, 1.0]])
    assert cosine_rows(a, b).tolist() == pytest.approx([1.0, -1.0, 0.0])
    with pytest.raises(ValueError):
        cosine_rows(a, b[:2])


def test_threshold_is_inclusive():
    assert passes(0.8, 0.8) and not passes(0.7999, 0.8) and passes(0.5, 0.0) and not passes(0.99, 1.01)


class BagOfWords:
    """A real (if simple) encoder: word counts over a fixed vocabulary."""

    vocab = ["median", "data", "grouped", "cat", "sort", "list"]

    def encode(self, texts, batch_size, convert_to_tensor, show_progress_bar):
        return torch.tensor([[t.lower().split().count(w) for w in self.vocab] for t in texts], dtype=torch.float)


def test_filter_pairs_originals_with_their_rewrites():
    f = SemanticFilter(BagOfWords())
    sims = f.similarities(["median of grouped data", "sort the list"], ["grouped data median", "a cat"])
    assert sims == pytest.approx([1.0, 0.0])
    assert f.similarities([], []) == []


@pytest.mark.slow
def test_embedded_encoder_separates_paraphrase_from_unrelated():
    from raftune.models import load_encoder

    f = SemanticFilter(load_encoder("default", device="cpu"))
    para, unrelated = f.similarities(
        ["Return the median of grouped continuous data.", "Return the median of grouped continuous data."],
        ["It computes the median of continuous data that is grouped into intervals.", "Cats sleep most of the day."],
    )
    assert para > 0.5 and unrelated < 0.2, (para, unrelated)
