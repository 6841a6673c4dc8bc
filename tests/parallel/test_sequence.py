"""Context parallelism on 2 gloo processes: each rank scores some positions of every sequence (any
split: contiguous, load-balanced, interleaved), and every objective and option gives the whole
batch's loss, each rank's gradient its positions' part of the whole gradient."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import seqloss
from tests.conftest import assert_close_fp32
from tests.parallel import cases
from tests.parallel.test_vocab_logits import vocab_cases
from tests.parallel.workers import Pool


@pytest.fixture(scope="module")
def pool():
    workers = Pool(2)
    yield workers
    workers.close()


def check(case, owners, results) -> None:
    truth = cases.expected(case)
    for got in results:
        positions = got["positions"]
        expected = truth["loss"][..., positions] if case.reduction == "none" else truth["loss"]
        assert_close_fp32(got["loss"], expected, "forward")
        assert_close_fp32(got["grad"], truth["grad"][:, positions], "backward")
        if case.return_stats:
            z = truth["z_loss"][..., positions] if case.reduction == "none" else truth["z_loss"]
            assert_close_fp32(got["z_loss"], z, "forward")
            assert torch.equal(got["predicted"], truth["predicted"][:, positions])
            assert_close_fp32(got["accuracy"], truth["accuracy"], "forward")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=vocab_cases(), data=st.data())
def test_every_objective_and_option_on_a_split_sequence_equals_the_whole(pool, case, data):
    owners = tuple(data.draw(st.lists(st.integers(0, 1), min_size=case.N, max_size=case.N)))
    check(case, owners, pool.run(cases.context, case, owners))


@pytest.mark.parametrize("layout", ["even", "load_balanced"])
def test_the_layouts_context_parallelism_uses(pool, layout):
    N = 8
    halves = [0] * 4 + [1] * 4 if layout == "even" else [0, 0, 1, 1, 1, 1, 0, 0]
    case = cases.Case(B=2, N=N, V=9, bounds=(0, 9), objective="smile", common={"shift": True}, packed=True)
    check(case, tuple(halves), pool.run(cases.context, case, tuple(halves)))
    made = pool.run(_positions, N, layout)
    assert [p.tolist() for p in made] == [[n for n in range(N) if halves[n] == r] for r in range(2)]


def _positions(length: int, layout: str) -> torch.Tensor:
    return getattr(seqloss.ContextParallel, layout)(length).positions


def _bad(_: int) -> list[str]:
    logits, labels = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 6))
    messages = []
    for positions, impl in (([0, 1], "auto"), ([0, 9, 10], "auto"), ([2, 1, 0], "auto"), ([0, 2, 4], "reference")):
        try:
            seqloss.cross_entropy(logits, labels, impl=impl,
                                  context_parallel=seqloss.ContextParallel(torch.tensor(positions)))
        except ValueError as error:
            messages.append(str(error))
    return messages


def test_bad_positions_are_named(pool):
    for messages in pool.run(_bad, 0):
        assert len(messages) == 4
        assert "holds 2 positions but logits have 3" in messages[0]
        assert "ascending positions in [0, 6)" in messages[1] and "ascending" in messages[2]
        assert "impl='reference'" in messages[3]


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(case=vocab_cases(), data=st.data())
def test_four_ranks(case, data):
    from tests.parallel.test_vocab_logits import four_ranks
    owners = tuple(data.draw(st.lists(st.integers(0, 3), min_size=case.N, max_size=case.N)))
    check(case, owners, four_ranks().run(cases.context, case, owners))


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(case=vocab_cases(), data=st.data())
def test_a_sequence_split_over_one_group_and_the_vocabulary_over_another(case, data):
    from tests.parallel.test_vocab_logits import four_ranks
    case = cases.Case(**{**case.__dict__, "return_stats": False})
    owners = tuple(data.draw(st.lists(st.integers(0, 1), min_size=case.N, max_size=case.N)))
    truth = cases.expected(case)
    for got in four_ranks().run(cases.vocab_and_context, case, owners):
        positions, columns = got["positions"], slice(got["start"], got["stop"])
        expected = truth["loss"][..., positions] if case.reduction == "none" else truth["loss"]
        assert_close_fp32(got["loss"], expected, "forward")
        assert_close_fp32(got["grad"], truth["grad"][:, positions][..., columns], "backward")


def _eager_and_compiled(_: int) -> list[bool]:
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    y8 = torch.randint(0, 8, (2, 3), generator=torch.Generator().manual_seed(0))
    y6 = torch.randint(0, 4, (2, 6), generator=torch.Generator().manual_seed(1))
    shard, split = seqloss.VocabParallel.even(8), seqloss.ContextParallel.even(6)
    calls = [lambda z: seqloss.smile_loss(z * 2, y8, vocab_parallel=shard),
             lambda z: seqloss.smile_loss(z * 2, y6, context_parallel=split)]
    same = []
    for call in calls:
        results = []
        for fn in (call, torch.compile(call, backend="aot_eager")):  # a graph break around the collectives
            leaf = x.clone().requires_grad_(True)
            loss = fn(leaf)
            loss.backward()
            results.append((loss.detach(), leaf.grad))
        same.append(bool(torch.allclose(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1])))
    return same


def test_parallel_calls_run_inside_a_compiled_function(pool):
    for same in pool.run(_eager_and_compiled, 0):
        assert same == [True, True]


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(case=vocab_cases(), data=st.data(), split=st.sampled_from(["cp", "tp"]))
def test_data_parallel_ranks_each_splitting_their_sequences_or_their_vocabulary(case, data, split):
    from tests.parallel.test_vocab_logits import four_ranks
    # random_subset's draws depend on the rows a call gets (like dropout's under data parallelism)
    assume(case.objective != "random_subset")
    case = cases.Case(**{**case.__dict__, "B": 2 * max(1, case.B // 2), "reduction": "mean", "return_stats": False,
                         "common": {k: v for k, v in case.common.items() if k != "num_items_in_batch"}})
    owners = tuple(data.draw(st.lists(st.integers(0, 1), min_size=case.N, max_size=case.N)))
    truth = cases.expected(case)
    results = four_ranks().run(cases.with_data_parallel, case, owners, split)
    assert_close_fp32(sum(r["loss"] for r in results if r["first"]), truth["loss"], "forward")
    for got in results:
        expected = truth["grad"][got["rows"]][:, got["positions"]][..., got["columns"]]
        assert_close_fp32(got["grad"], expected, "backward")
