"""A 2-process gloo FSDP2 run with DSV matches the 1-process run: the predictors' gradients,
losses and profiles are averaged over the data-parallel group, so stage, predictor loss,
recall and the DiT's loss agree step by step."""
import pytest

from tests.train.helpers import run_train

DSV = ["--sparse", "dsv", "--sparse.block-size", "8", "--sparse.row-stride", "4", "--sparse.profile-every", "1",
       "--sparse.min-dense-steps", "0", "--sparse.max-dense-steps", "2", "--sparse.dispatch", "sparse",
       "--sparse.min-density", "0.25", "--no-sparse.timing"]


@pytest.mark.slow
def test_two_process_dsv_matches_one_process(tmp_path):
    single, sharded = run_train(tmp_path, "single", 1, *DSV), run_train(tmp_path, "fsdp", 2, *DSV)
    assert [r["sparse/stage"] for r in single] == [r["sparse/stage"] for r in sharded] == [1, 2, 2, 2]
    for a, b in zip(single, sharded):
        # fp32; differences come from the order of reductions (sums of 2 halves)
        for key in ("loss", "sparse/predictor_loss", "sparse/recall", "sparse/budget"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert b["sparse/density"] == a["sparse/density"]
