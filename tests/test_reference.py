"""The dense spec against the seeds' own code (SMILE authors' T5 and BLIP snippets, random and reverse
subsetting), PyTorch's and Hugging Face's cross-entropy conventions. Each check runs both impls."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.nn import CrossEntropyLoss

import seqloss
from tests.conftest import IGNORE, assert_close_fp32, generator, loss_and_grad, make_labels, make_logits

IMPLS = ("reference", "torch")


def _check(fn, logits, labels, oracle, **kwargs):
    """fn(impl=...) equals ``oracle(logits)`` in value and gradient, for both impls."""
    want, want_grad = loss_and_grad(lambda x, _: oracle(x), logits, labels)
    for impl in IMPLS:
        got, got_grad = loss_and_grad(fn, logits, labels, impl=impl, **kwargs)
        assert_close_fp32(got, want)
        assert_close_fp32(got_grad, want_grad, "backward")


# --- the seeds' code, verbatim up to variable plumbing -----------------------------------------


def seed_t5_smile(lm_logits, labels):
    """SMILE authors' snippet for transformers' T5 (ignore -100, id 0 dropped, position 0 full)."""
    bs, N = labels.shape
    vs = lm_logits.size(-1)
    labels_ = labels.clone()
    labels_[labels_ == -100] = 0
    logits_mask = torch.zeros(bs, vs).to(labels.device).scatter_(1, labels_, True)
    logits_mask[:, 0] = 0
    logits_mask = logits_mask.unsqueeze(1).expand(-1, N, -1).clone()
    logits_mask[:, 0, :] = 1
    selected_logits = lm_logits.masked_fill(logits_mask == 0, float('-inf'))
    loss_fct = CrossEntropyLoss(ignore_index=-100)
    return loss_fct(selected_logits.view(-1, selected_logits.size(-1)), labels.view(-1))


def seed_blip_smile(decoder_logits, input_ids, prompt_length):
    """SMILE authors' snippet for BLIP (pad id 0 is ignored and dropped from the support)."""
    logits = decoder_logits[:, prompt_length - 1:-1]
    label = input_ids[:, prompt_length:].contiguous()
    N = label.size(1)
    bs = input_ids.size(0)
    vs = decoder_logits.size(-1)
    logits_mask = torch.zeros(bs, vs).to(logits.device).scatter_(1, label, True)
    logits_mask[:, 0] = 0
    logits_mask = logits_mask.unsqueeze(1).expand(-1, N, -1).clone()
    selected_logits = logits.masked_fill(logits_mask == 0, float('-inf'))
    return F.cross_entropy(selected_logits.reshape(-1, vs), label.view(-1), ignore_index=0, reduction='mean')


def seed_pseudocode_smile(logits, labels):
    """The paper's pseudocode (labels without ignored positions)."""
    B, N, V = logits.shape
    logits_mask = torch.zeros(B, V).scatter_(1, labels, True)
    logits_mask = logits_mask.unsqueeze(1).expand(-1, N, -1).clone()
    logits_mask[:, 0, :] = True
    selected_logits = logits.masked_fill(logits_mask == False, float('-inf'))  # noqa: E712 (seed's code)
    return F.cross_entropy(selected_logits.reshape(-1, V), labels.reshape(-1))


def seed_random_subset(logits, label, sample_num, gen):
    """SMILE authors' random subsetting (BLIP convention: pad id 0 ignored and dropped)."""
    bs, N, vs = logits.shape
    rand_indices = torch.randint(vs, (bs, N, sample_num), generator=gen).to(label.device)
    rand_indices_with_label = torch.cat((rand_indices, label.unsqueeze(2)), dim=2)
    batch_indices = torch.arange(bs)[:, None, None].expand(bs, N, sample_num + 1)
    seq_indices = torch.arange(N)[None, :, None].expand(bs, N, sample_num + 1)
    random_mask = torch.zeros(bs, N, vs).to(label.device)
    random_mask[batch_indices, seq_indices, rand_indices_with_label] = 1
    random_mask[:, :, 0] = 0
    selected_logits = logits.masked_fill(random_mask == 0, float('-inf'))
    return F.cross_entropy(selected_logits.view(-1, vs), label.view(-1), ignore_index=0, reduction='mean')


def seed_reverse_subset(logits, label):
    """SMILE authors' reverse subsetting (BLIP convention: pad id 0 ignored)."""
    bs, N, vs = logits.shape
    reverse_mask = torch.ones(bs, vs).to(logits.device).scatter_(1, label, False)
    reverse_mask = reverse_mask.unsqueeze(1).expand(-1, N, -1).clone()
    reverse_mask.scatter_(2, label.unsqueeze(-1), 1)
    selected_logits = logits.masked_fill(reverse_mask == 0, float('-inf'))
    return F.cross_entropy(selected_logits.view(-1, vs), label.view(-1), ignore_index=0, reduction='mean')


def hf_causal_lm_loss(logits, labels, num_items_in_batch=None, ignore_index=-100):
    """Hugging Face's ``ForCausalLMLoss``: upcast, shift, cross-entropy (sum / num_items_in_batch)."""
    logits = logits.float()
    shift_logits = logits[..., :-1, :].contiguous().view(-1, logits.shape[-1])
    shift_labels = labels[..., 1:].contiguous().view(-1)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


# --- batches in the seeds' conventions ---------------------------------------------------------


def t5_labels(B, N, V, seed):
    """Position 0 supervised in each row, padding -100 at the ends, no id 0 after position 0."""
    labels = torch.randint(1, V, (B, N), generator=generator(seed))
    lengths = torch.randint(1, N + 1, (B,), generator=generator(seed + 1))
    labels[torch.arange(N) >= lengths[:, None]] = IGNORE
    labels[1, -2:] = IGNORE
    labels[0, 0] = 0  # id 0 is fine where the vocabulary is full
    labels[:, N // 2] = torch.where(labels[:, N // 2] == IGNORE, IGNORE, labels[:, 0].clamp(min=1))  # repeats
    return labels


def blip_input_ids(B, L, V, seed):
    """Right-padded with 0 (BLIP's pad id, its ignore_index); every row has at least one pad."""
    ids = torch.randint(1, V, (B, L), generator=generator(seed))
    lengths = torch.randint(3, L, (B,), generator=generator(seed + 1))
    return torch.where(torch.arange(L) >= lengths[:, None], 0, ids)


# --- SMILE -------------------------------------------------------------------------------------


@pytest.mark.parametrize("V", [37, 101])
def test_smile_equals_seed_t5_snippet(V):
    B, N = 4, 9
    logits = make_logits(B, N, V, seed=1)
    labels = t5_labels(B, N, V, seed=1)
    assert (labels[:, 0] != IGNORE).all() and (labels == IGNORE).any()
    _check(seqloss.smile_loss, logits, labels, lambda x: seed_t5_smile(x, labels), exclude_ids=(0,))


@pytest.mark.parametrize("prompt_length", [1, 3])
def test_smile_equals_seed_blip_snippet(prompt_length):
    B, L, V = 4, 10, 37
    decoder_logits = make_logits(B, L, V, seed=2)
    input_ids = blip_input_ids(B, L, V, seed=2)
    p = prompt_length
    # BLIP: shift, pad 0 ignored; the snippet's support has no first-token MLE and never holds id 0.
    _check(seqloss.smile_loss, decoder_logits[:, p - 1:], input_ids[:, p - 1:],
           lambda x: seed_blip_smile(torch.cat([decoder_logits[:, :p - 1], x], dim=1), input_ids, p),
           shift=True, ignore_index=0, first_token_mle=False)


def test_smile_equals_seed_pseudocode_without_ignored_labels():
    B, N, V = 3, 7, 37
    logits = make_logits(B, N, V, seed=3)
    labels = torch.randint(0, V, (B, N), generator=generator(3))
    _check(seqloss.smile_loss, logits, labels, lambda x: seed_pseudocode_smile(x, labels))


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_labels_never_leak_into_the_row_set(impl):
    # The seeds write -100 -> 0 before the scatter; the spec never lets an ignored label in.
    V = 37
    labels = torch.tensor([[5, 7, 9, IGNORE, IGNORE]])
    logits = make_logits(1, 5, V, seed=4)
    loud = logits.clone()
    loud[..., 0] = 50.0  # id 0 would dominate any support it leaked into
    quiet = seqloss.smile_loss(logits, labels, impl=impl, reduction="none", first_token_mle=False)
    assert_close_fp32(seqloss.smile_loss(loud, labels, impl=impl, reduction="none", first_token_mle=False), quiet)
    # the support of (0, n) is exactly {5, 7, 9}
    expected = torch.logsumexp(logits[0, :3][:, [5, 7, 9]], -1) - logits[0, :3].gather(1, labels[0, :3, None])[:, 0]
    assert_close_fp32(quiet[0, :3], expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_first_token_mle_uses_the_first_supervised_position_after_the_shift(impl):
    V = 37
    logits = make_logits(2, 6, V, seed=5)
    labels = torch.tensor([[3, 8, 8, 4, IGNORE, IGNORE],       # shifted: first target at position 0
                           [IGNORE, IGNORE, IGNORE, 6, 2, 6]])  # shifted: first target at position 2
    got = seqloss.smile_loss(logits, labels, shift=True, impl=impl, reduction="none")
    mle = seqloss.cross_entropy(logits, labels, shift=True, impl=impl, reduction="none")
    assert_close_fp32(got[0, 0], mle[0, 0])
    assert_close_fp32(got[1, 2], mle[1, 2])
    # the other positions use the row's shifted token set: row 0 is {8, 4} (3 was shifted away)
    row0 = logits[0, 1:3][:, [4, 8]]
    assert_close_fp32(got[0, 1:3], torch.logsumexp(row0, -1) - logits[0, [1, 2], [8, 4]])
    without = seqloss.smile_loss(logits, labels, shift=True, impl=impl, reduction="none", first_token_mle=False)
    assert (without[0, 0] < mle[0, 0]) and (without[1, 2] < mle[1, 2])


def test_exclude_ids_leave_the_first_token_full():
    V = 37
    logits = make_logits(1, 4, V, seed=6)
    labels = torch.tensor([[0, 5, 0, 6]])  # id 0 (a pad that leaks into labels) excluded from the row set
    for impl in IMPLS:
        got = seqloss.smile_loss(logits, labels, impl=impl, reduction="none", exclude_ids=(0,))
        mle = seqloss.cross_entropy(logits, labels, impl=impl, reduction="none")
        assert_close_fp32(got[0, 0], mle[0, 0])
        support = [5, 6]
        want = torch.logsumexp(logits[0, 1:, support], -1)
        want = want - logits[0, 1:].gather(1, labels[0, 1:, None])[:, 0]
        want[1] = torch.logsumexp(logits[0, 2, [0, 5, 6]], -1) - logits[0, 2, 0]  # the label stays in
        assert_close_fp32(got[0, 1:], want)


# --- random and reverse subsetting -------------------------------------------------------------


@pytest.mark.parametrize("sample_num", [1, 10])
def test_random_subset_equals_seed_with_the_same_draws(sample_num):
    B, N, V = 3, 8, 37
    logits = make_logits(B, N, V, seed=7)
    label = blip_input_ids(B, N, V, seed=7)
    want, want_grad = loss_and_grad(lambda x, _: seed_random_subset(x, label, sample_num, generator(70)),
                                    logits, label)
    for impl in IMPLS:
        got, got_grad = loss_and_grad(seqloss.random_subset_loss, logits, label, num_samples=sample_num,
                                      generator=generator(70), ignore_index=0, exclude_ids=(0,), impl=impl)
        assert_close_fp32(got, want)
        assert_close_fp32(got_grad, want_grad, "backward")


def test_reverse_subset_equals_seed_without_ignored_labels():
    B, N, V = 3, 8, 37
    logits = make_logits(B, N, V, seed=8)
    label = torch.randint(1, V, (B, N), generator=generator(8))
    _check(seqloss.reverse_subset_loss, logits, label, lambda x: seed_reverse_subset(x, label))


def test_reverse_subset_equals_seed_with_pad_as_ignore_index():
    # The seed scatters the pad id 0 into the row set, so 0 leaves every support: exclude_ids=(0,).
    B, N, V = 3, 8, 37
    logits = make_logits(B, N, V, seed=9)
    label = blip_input_ids(B, N, V, seed=9)
    assert ((label == 0).sum(1) > 0).all()
    _check(seqloss.reverse_subset_loss, logits, label, lambda x: seed_reverse_subset(x, label),
           ignore_index=0, exclude_ids=(0,))


# --- the other support rules, as dense one-liners ----------------------------------------------


def test_selective_eos_equals_masking_eos_where_the_label_is_not_eos():
    B, N, V, eos = 3, 6, 37, 2
    logits = make_logits(B, N, V, seed=10)
    labels = make_labels(B, N, vocab_size=V, seed=10)
    labels[:, -2] = eos

    def oracle(x):
        keep_eos = (labels == eos).unsqueeze(-1)
        eos_column = torch.zeros(V, dtype=torch.bool)
        eos_column[eos] = True
        masked = x.masked_fill(eos_column & ~keep_eos, float("-inf"))
        return F.cross_entropy(masked.reshape(-1, V), labels.reshape(-1))

    _check(seqloss.selective_eos_loss, logits, labels, oracle, eos_token_id=eos)


@pytest.mark.parametrize("shift", [False, True])
def test_subset_include_per_position_equals_dense_candidates(shift):
    B, N, V, K = 2, 5, 37, 4
    logits = make_logits(B, N, V, seed=11)
    labels = make_labels(B, N, vocab_size=V, seed=11, ignore_fraction=0.0)
    include = torch.randint(-1, V, (B, N, K), generator=generator(11))

    def oracle(x):
        y = labels[:, 1:] if shift else labels
        cand = include[:, 1:] if shift else include
        x = x[:, :-1] if shift else x
        mask = torch.zeros(*y.shape, V + 1, dtype=torch.bool)
        mask.scatter_(2, torch.where(cand < 0, V, cand), True)
        mask = mask[..., :V].scatter(2, y.unsqueeze(-1), True)
        return F.cross_entropy(x.masked_fill(~mask, float("-inf")).reshape(-1, V), y.reshape(-1))

    _check(seqloss.subset_cross_entropy, logits, labels, oracle, include=include, shift=shift)


# --- PyTorch and Hugging Face conventions ------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_mle_equals_torch_cross_entropy(label_smoothing, reduction):
    B, N, V = 3, 7, 37
    logits = make_logits(B, N, V, seed=12)
    labels = make_labels(B, N, vocab_size=V, seed=12)

    def oracle(x):
        out = F.cross_entropy(x.reshape(-1, V), labels.reshape(-1), label_smoothing=label_smoothing,
                              reduction=reduction)
        return out.reshape(B, N) if reduction == "none" else out

    grad_output = torch.randn(B, N, generator=generator(1)) if reduction == "none" else None
    want, want_grad = loss_and_grad(lambda x, _: oracle(x), logits, labels, grad_output=grad_output)
    for impl in IMPLS:
        got, got_grad = loss_and_grad(seqloss.cross_entropy, logits, labels, grad_output=grad_output, impl=impl,
                                      label_smoothing=label_smoothing, reduction=reduction)
        assert_close_fp32(got, want)
        assert_close_fp32(got_grad, want_grad, "backward")


@pytest.mark.parametrize("name", ["reverse_subset", "selective_eos", "subset"])
def test_smoothing_over_a_full_support_equals_torch(name):
    # A support that is all V ids for every label: smoothing must equal F.cross_entropy's.
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=13)
    labels = torch.full((B, N), 4)
    options = {"reverse_subset": dict(), "selective_eos": dict(eos_token_id=4),
               "subset": dict(exclude=torch.full((B, 1), -1))}[name]
    _check(lambda x, y, **kw: seqloss.objective_loss(x, y, name, **kw), logits, labels,
           lambda x: F.cross_entropy(x.reshape(-1, V), labels.reshape(-1), label_smoothing=0.2),
           label_smoothing=0.2, **options)


@pytest.mark.parametrize("impl", IMPLS)
def test_smoothing_spreads_over_the_support(impl):
    V, eps = 37, 0.1
    logits = make_logits(1, 3, V, seed=14)
    labels = torch.tensor([[5, 7, 5]])
    got = seqloss.smile_loss(logits, labels, label_smoothing=eps, first_token_mle=False, impl=impl,
                             reduction="none")
    logp = torch.log_softmax(logits[0][:, [5, 7]], -1)
    want = -(1 - eps) * logp.gather(1, torch.tensor([[0], [1], [0]]))[:, 0] - eps * logp.mean(-1)
    assert_close_fp32(got[0], want)


@pytest.mark.parametrize("num_items_in_batch", [None, 11])
def test_shift_equals_hugging_face_causal_lm_loss(num_items_in_batch):
    B, N, V = 3, 8, 37
    logits = make_logits(B, N, V, seed=15)
    labels = make_labels(B, N, vocab_size=V, seed=15)
    _check(seqloss.cross_entropy, logits, labels,
           lambda x: hf_causal_lm_loss(x, labels, num_items_in_batch), shift=True,
           num_items_in_batch=num_items_in_batch)


def test_shift_on_bf16_logits_equals_hugging_face_upcast():
    B, N, V = 2, 6, 37
    logits = make_logits(B, N, V, seed=16, dtype=torch.bfloat16)
    labels = make_labels(B, N, vocab_size=V, seed=16)
    want = hf_causal_lm_loss(logits, labels)
    for impl in IMPLS:
        assert_close_fp32(seqloss.cross_entropy(logits, labels, shift=True, impl=impl), want)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_sequence_reduction_equals_blip_per_row_sum(label_smoothing):
    # BLIP's BertLMHeadModel(reduction='none'): shifted token losses summed per row.
    B, N, V = 3, 7, 37
    logits = make_logits(B, N, V, seed=17)
    labels = make_labels(B, N, vocab_size=V, seed=17, ignored_rows=(2,))

    def blip(x):
        token = F.cross_entropy(x[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="none",
                                label_smoothing=label_smoothing)
        return token.view(B, -1).sum(1)

    grad_output = torch.randn(B, generator=generator(2))
    want, want_grad = loss_and_grad(lambda x, _: blip(x), logits, labels, grad_output=grad_output)
    for impl in IMPLS:
        got, got_grad = loss_and_grad(seqloss.cross_entropy, logits, labels, grad_output=grad_output, impl=impl,
                                      shift=True, reduction="sequence", label_smoothing=label_smoothing)
        assert got.shape == (B,) and got[2] == 0
        assert_close_fp32(got, want)
        assert_close_fp32(got_grad, want_grad, "backward")
        none = seqloss.smile_loss(logits, labels, impl=impl, shift=True, reduction="none")
        assert_close_fp32(seqloss.smile_loss(logits, labels, impl=impl, shift=True, reduction="sequence"),
                          none.sum(-1))


@pytest.mark.parametrize("impl", IMPLS)
def test_reductions_agree_with_each_other(impl):
    B, N, V = 3, 7, 37
    logits = make_logits(B, N, V, seed=18)
    labels = make_labels(B, N, vocab_size=V, seed=18)
    none = seqloss.smile_loss(logits, labels, impl=impl, reduction="none")
    assert none.shape == (B, N)
    assert (none[labels == IGNORE] == 0).all() and (none[labels != IGNORE] >= 0).all()
    assert_close_fp32(seqloss.smile_loss(logits, labels, impl=impl, reduction="sum"), none.sum())
    assert_close_fp32(seqloss.smile_loss(logits, labels, impl=impl, reduction="mean"),
                      none.sum() / (labels != IGNORE).sum())


def test_mixture_equals_the_authors_checkpoint_formula():
    B, N, V = 3, 7, 37
    logits = make_logits(B, N, V, seed=19)
    labels = t5_labels(B, N, V, seed=19)
    want = lambda x: 0.01 * F.cross_entropy(x.reshape(-1, V), labels.reshape(-1)) + 0.99 * seed_t5_smile(x, labels)
    _check(lambda x, y, **kw: seqloss.objective_loss(x, y, {"mle": 0.01, "smile": 0.99}, **kw), logits, labels,
           want, exclude_ids=(0,))


@settings(max_examples=30, deadline=None)
@given(B=st.integers(0, 3), N=st.integers(1, 6), V=st.integers(1, 40), seed=st.integers(0, 2**16),
       eps=st.floats(0.0, 0.95), impl=st.sampled_from(IMPLS))
def test_property_smoothing_over_the_full_vocabulary_equals_torch(B, N, V, seed, eps, impl):
    logits = make_logits(B, N, V, seed=seed)
    labels = make_labels(B, N, vocab_size=V, seed=seed)
    want, want_grad = loss_and_grad(
        lambda x, _: F.cross_entropy(x.reshape(-1, V), labels.reshape(-1), label_smoothing=eps, reduction="sum"),
        logits, labels)
    got, got_grad = loss_and_grad(seqloss.cross_entropy, logits, labels, label_smoothing=eps, reduction="sum",
                                  impl=impl)
    assert_close_fp32(got, want)
    assert_close_fp32(got_grad, want_grad, "backward")
