"""Vocabulary-parallel losses on 2 gloo processes (4 in the slow run): every objective and option
equals the single-process dense spec, each rank's gradient is its slice of the whole gradient, and
the collectives stay within Megatron-LM's three (B, N) all-reduces."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import seqloss
from tests.conftest import OBJECTIVES_AND_MIXTURE, assert_close_fp32
from tests.parallel import cases
from tests.parallel.cases import Case
from tests.parallel.workers import Pool


@pytest.fixture(scope="module")
def pool():
    workers = Pool(2)
    yield workers
    workers.close()


def check(case: Case, results: list[dict]) -> None:
    truth = cases.expected(case)
    for rank, got in enumerate(results):
        assert_close_fp32(got["loss"], truth["loss"], "forward")
        assert_close_fp32(got["grad"], truth["grad"][..., got["start"]:got["stop"]], "backward")
        if case.return_stats:
            assert_close_fp32(got["z_loss"], truth["z_loss"], "forward")
            assert torch.equal(got["predicted"], truth["predicted"]), f"rank {rank}: argmax"
            assert_close_fp32(got["accuracy"], truth["accuracy"], "forward")


@st.composite
def vocab_cases(draw, ranks: int = 2) -> Case:
    V = draw(st.integers(ranks, 40))
    inner = sorted(draw(st.lists(st.integers(0, V), min_size=ranks - 1, max_size=ranks - 1)))  # uneven, even empty
    common = {}
    if draw(st.booleans()):
        common["label_smoothing"] = draw(st.sampled_from([0.1, 0.3]))
    if draw(st.booleans()):
        common["softcap"] = draw(st.sampled_from([2.0, 5.0]))
    if draw(st.booleans()):
        common["z_loss"] = 1e-2
    if draw(st.booleans()):
        common["shift"] = True
    turns = draw(st.booleans())
    if turns:
        common["turns"] = True
    reduction = draw(st.sampled_from(["mean", "sum", "none", "sequence"]))
    packed = draw(st.booleans()) and reduction != "sequence"
    if reduction == "mean" and draw(st.booleans()):
        common["num_items_in_batch"] = 7
    return Case(B=draw(st.integers(1, 3)), N=draw(st.integers(1, 6)), V=V, bounds=(0, *inner, V),
                objective=draw(st.sampled_from(OBJECTIVES_AND_MIXTURE)), seed=draw(st.integers(0, 2**16)),
                reduction=reduction, ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])), common=common,
                packed=packed, token_weights=draw(st.booleans()),
                class_weights="label_smoothing" not in common and draw(st.booleans()),
                return_stats=draw(st.booleans()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=vocab_cases())
def test_every_objective_and_option_on_a_vocabulary_shard_equals_the_whole(pool, case):
    check(case, pool.run(cases.sharded, case))


@pytest.mark.parametrize("objective", OBJECTIVES_AND_MIXTURE)
def test_a_dtensor_sharded_on_the_vocabulary(pool, objective):
    case = Case(B=2, N=5, V=11, bounds=(0, 6, 11), objective=objective, common={"shift": True, "z_loss": 1e-3},
                return_stats=True)
    results = pool.run(cases.dtensor, case)
    check(case, results)
    assert all("Shard(dim=2)" in r["placements"] for r in results)


def test_a_shard_without_any_label_of_a_row(pool):
    # Labels drawn from [0, 20) only: rank 1's ids [20, 32) hold no label and no SMILE candidate.
    case = Case(B=2, N=6, V=32, bounds=(0, 20, 32), objective="smile", ignore_fraction=0.0)
    check(case, pool.run(cases.sharded, case))


@pytest.mark.parametrize("objective", ["mle", "smile", "random_subset", "reverse_subset"])
def test_collectives_stay_within_megatrons_three_all_reduces(pool, objective):
    B, N, V = 4, 16, 64
    case = Case(B=B, N=N, V=V, bounds=(0, 32, 64), objective=objective, ignore_fraction=0.0)
    for seen in pool.run(cases.counted, case):
        assert {name for name, _ in seen} == {"all_reduce"}, seen
        megatron = 3 * B * N * 4
        data = sum(size for _, size in seen) - 16  # the two int64 of the ranks' same-plan check
        assert data <= megatron, seen
        assert max(size for _, size in seen) < V * 4 * B * N  # nothing of the vocabulary's size


def test_the_vocab_parallel_keyword_is_checked():
    logits, labels = torch.randn(2, 3, 4), torch.randint(0, 8, (2, 3))
    with pytest.raises(TypeError, match="vocab_parallel"):
        seqloss.cross_entropy(logits, labels, vocab_parallel=(0, 4, 8))
    with pytest.raises(ValueError, match="init_process_group"):
        seqloss.cross_entropy(logits, labels, vocab_parallel=seqloss.VocabParallel(0, 4, 8))


def _bad_calls(_: int) -> list[str]:
    messages = []
    logits, labels = torch.randn(2, 3, 4), torch.randint(0, 8, (2, 3))
    for kwargs in (dict(vocab_parallel=seqloss.VocabParallel(0, 5, 8)),
                   dict(vocab_parallel=seqloss.VocabParallel(4, 8, 8), impl="triton"),
                   dict(vocab_parallel=seqloss.VocabParallel(6, 10, 8))):
        try:
            seqloss.cross_entropy(logits, labels, **kwargs)
        except ValueError as error:
            messages.append(str(error))
    return messages


def test_bad_slices_are_named(pool):
    for messages in pool.run(_bad_calls, 0):
        assert len(messages) == 3
        assert "holds 4 ids" in messages[0]
        assert "impl='triton'" in messages[1]
        assert "start <= stop <= vocab_size" in messages[2]


def _different_draws(_: int) -> str:
    import torch.distributed as dist
    logits = torch.randn(2, 3, 4)
    labels = torch.randint(0, 8, (2, 3), generator=torch.Generator().manual_seed(0))
    shard = seqloss.VocabParallel.even(8)
    try:
        seqloss.random_subset_loss(logits, labels, generator=torch.Generator().manual_seed(dist.get_rank()),
                                   vocab_parallel=shard)
    except ValueError as error:
        return str(error)
    return "no error"


def test_ranks_that_draw_different_candidates_are_told(pool):
    for message in pool.run(_different_draws, 0):
        assert "seed it" in message


_FOUR: list[Pool] = []


def four_ranks() -> Pool:
    """A pool of 4, started once for the slow tests of the session (its processes end with it)."""
    if not _FOUR:
        _FOUR.append(Pool(4))
    return _FOUR[0]


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(case=vocab_cases(ranks=4))
def test_four_ranks(case):
    check(case, four_ranks().run(cases.sharded, case))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=vocab_cases(), as_dtensor=st.booleans())
def test_the_fused_head_with_a_vocabulary_sharded_weight(pool, case, as_dtensor):
    check_head(pool, case, as_dtensor)


def check_head(workers: Pool, case: Case, as_dtensor: bool) -> None:
    case = Case(**{**case.__dict__, "return_stats": False})
    truth = cases.linear_expected(case)
    for got in workers.run(cases.linear_sharded, case, as_dtensor):
        assert_close_fp32(got["loss"], truth["loss"], "forward")
        assert_close_fp32(got["hidden"], truth["hidden"], "backward")  # summed over the group
        assert_close_fp32(got["weight"], truth["weight"][got["start"]:got["stop"]], "backward")
        assert_close_fp32(got["bias"], truth["bias"][got["start"]:got["stop"]], "backward")


def _fsdp_weight_read_outside_its_forward(_: int) -> str:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    head = fully_shard(torch.nn.Linear(4, 10, bias=False))
    rank = dist.get_rank()
    labels = torch.randint(0, 10, (2, 3), generator=torch.Generator().manual_seed(rank))  # each rank its batch
    try:
        seqloss.linear_loss(torch.randn(2, 3, 4), head.weight, labels)
    except ValueError as error:
        return str(error)
    return "no error"


def test_a_weight_fsdp_shards_is_not_taken_for_a_vocabulary_shard(pool):
    for message in pool.run(_fsdp_weight_read_outside_its_forward, 0):
        assert "FSDP" in message and "differ" in message


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(case=vocab_cases(ranks=4), as_dtensor=st.booleans())
def test_the_fused_head_on_four_ranks(case, as_dtensor):
    check_head(four_ranks(), case, as_dtensor)
