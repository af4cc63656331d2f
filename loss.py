"""CAVP objective (Sec. 4.2): in-batch pairing (Eq. 1), anchor sets (Eq. 2), the contrastive loss
(Eqs. 3-4, averaged over anchors as in Eq. 5), pixel sampling, the SupCon baseline (Table 5)
and the waveform memory bank (App. B.1).

Every pixel of a pairing gets a role, the one vocabulary shared by the functions below:
    c >= 1  E_fg       labelled class c, and c is in the paired audio
    0       E_bg       a silent object, or background of a pairing whose audio brings no class new to the image
    -1      E_unknown  background of a pairing whose audio holds a class the image's own audio lacks
                       (the pixel may be an unlabelled object of that class)
    -2      ignore     label 255
A training step (train.train_step) uses it like this, on the original pairs and the permuted ones stacked:
    perm = pair_permutation(B)                                             # Eq. 1
    z = torch.cat([z_orig, z_perm])                                        # 2B, D, h, w
    role = pixel_roles(torch.cat([y, y]), torch.cat([t, a_hot]), torch.cat([t, t]), size=z.shape[-2:])   # Eq. 2
    idx = sample_pixels(role, max_anchors=512, pos_frac=0.5)               # ours: caps and E_fg : E_bg
    l_cp = cavp_loss(gather_pixels(z, idx), role[idx], tau=0.1)            # Eqs. 3-4
    loss = cross_entropy(logits_orig, y, ignore_index=255) + cavp_weight * l_cp   # Eq. 5
"""
import argparse
import math
import os
import statistics
import time
from collections import deque

import torch
import torch.nn.functional as F

IGNORE = 255          # label value of ignored pixels
ROLE_UNKNOWN = -1     # E_unknown
ROLE_IGNORE = -2


def pair_permutation(B, *, generator=None, device=None):
    """Eq. 1: image i is fused with the audio of sample perm[i]; fixed points are the matched pairs."""
    return torch.randperm(B, generator=generator, device=device)


def anchor_sets(y, a_hot, own_hot):
    """Eq. 2 per pixel. y (N,) labels (0 background, 1..C-1, 255 ignore); a_hot (N, C) multi-hot classes of
    the audio paired with the pixel's image in this pairing; own_hot (N, C) those of the image's own audio.
    Column 0 (background) is never a sound. Bool or float. Returns role (N,) long (module docstring).

    Deviation from the paper's set notation: Eq. 2 compares t = y(w) as whole labels, and the official code
    calls a pairing matched only when the multi-hot sets are equal, which in MS turns the dog of an image
    {dog, cat} paired with audio {dog, car} into background. We decide per pixel: is this pixel's class in
    the paired audio."""
    N, C = a_hot.shape
    if own_hot.shape != (N, C) or y.shape != (N,):
        raise ValueError(f'loss.anchor_sets: y {tuple(y.shape)}, a_hot {tuple(a_hot.shape)} and own_hot '
                         f'{tuple(own_hot.shape)} must be (N,), (N, C), (N, C)')
    ignore = y == IGNORE
    if ((y < 0) | ((y >= C) & ~ignore)).any():
        raise ValueError(f'loss.anchor_sets: y holds labels outside 0..{C - 1} and {IGNORE}')
    a_hot, own_hot = a_hot.bool(), own_hot.bool()
    y = y.masked_fill(ignore, 0)
    sounding = a_hot.gather(1, y[:, None])[:, 0]                  # N: the pixel's class is in the paired audio
    new_class = (a_hot & ~own_hot)[:, 1:].any(1)                  # N: the audio brings a class the image lacks
    bg_role = torch.where(new_class, ROLE_UNKNOWN, 0)             # E_unknown or E_bg
    role = torch.where(y == 0, bg_role, torch.where(sounding, y, 0))   # E_fg, or a silent object in E_bg
    return role.masked_fill(ignore, ROLE_IGNORE)


def _info_nce(z, role, tau, *, denominator):
    """Mean over anchors (role >= 0, with at least one positive) of the mean over their positives of
    -log(exp(s_p) / den), s = z . z' / tau. Positives: the other pixels of the anchor's role; negatives:
    pixels of any other role >= 0. den = exp(s_p) + sum_n exp(s_n) (Eq. 4, denominator='negatives'), or
    den = the sum over every other pixel with role >= 0, positives included (Khosla et al., 'all').
    Memory: a few (N, N) matrices, never (N, N, D)."""
    z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)   # N, D; fp16 logits are too coarse
    s = (z / tau) @ z.T                    # N, N; scaling z first spares one (N, N) temporary
    valid = role >= 0
    same = role[:, None] == role[None, :]                                      # N, N
    pos = same & valid[:, None]
    pos.fill_diagonal_(False)
    neg = ~same & valid[:, None] & valid[None, :]     # for role 0 this is role >= 1: N_bg = E_fg
    # A row with nothing to sum gives logsumexp = -inf and a NaN gradient there; every entry of such a row
    # is masked out, and torch.where sends no gradient to the branch it did not pick, so neither NaN nor
    # inf reaches z. (torch.where rather than masked_fill: no copy of the (N, N) matrix.)
    if denominator == 'negatives':
        log_neg = torch.logsumexp(torch.where(neg, s, -math.inf), dim=1)      # N
        nll = F.softplus(log_neg[:, None] - s)        # N, N: log(e^s_p + sum_n e^s_n) - s_p, overflow-free
    elif denominator == 'all':
        log_all = torch.logsumexp(torch.where(pos | neg, s, -math.inf), dim=1)     # N
        nll = log_all[:, None] - s                                               # N, N
    else:
        raise ValueError(f'loss._info_nce: unknown denominator {denominator!r}')
    n_pos = pos.sum(1)                                                         # N
    per_anchor = torch.where(pos, nll, 0).sum(1) / n_pos.clamp(min=1)          # Eq. 4
    has_pos = n_pos > 0
    # Eq. 5: 1/|E| sum over anchors; anchors without positives are left out. With no anchor left this is
    # 0, still computed from z, so backward runs (zero gradients) on every rank of a DDP step.
    return (per_anchor * has_pos).sum() / has_pos.sum().clamp(min=1)


def cavp_loss(z, role, tau=0.1):
    """Eqs. 3-5. z (N, D) fused features (L2-normalised here), role (N,) from anchor_sets -> scalar.
    Anchors: role >= 0. Role c >= 1: positives the other role-c pixels (P_fg), negatives every pixel of role
    >= 0 and != c (N_fg, hard and easy together). Role 0: positives the other role-0 pixels (P_bg = E_bg),
    negatives role >= 1 (N_bg = E_fg). Roles -1 and -2 take no part. Each positive's denominator holds that
    positive and all the anchor's negatives, as in Eq. 4. Eq. 3 also asks a positive to share the anchor's
    whole audio label (t_j = t); we read it per pixel: any sounding pixel of class c is a positive, whatever
    else its audio holds, so MS pairings {dog} and {dog, car} pull their dogs together."""
    return _info_nce(z, role, tau, denominator='negatives')


def supcon_loss(z, y, tau=0.1):
    """Table 5 'SupCon': the supervised contrastive loss of Khosla et al. (L_out) over pixels of the
    original pairs. z (N, D), y (N,) labels (255 ignored) -> scalar. Classes are the pixel labels, background
    one class among others; there is no pairing and no E_unknown. It shares cavp_loss's code with role = y,
    but its denominator is Khosla's: the sum over every other valid pixel, so the anchor's other positives
    sit in it too, whereas Eq. 4 puts there only the positive at hand and the negatives."""
    return _info_nce(z, y.masked_fill(y == IGNORE, ROLE_IGNORE), tau, denominator='all')


def sample_pixels(role, *, max_anchors, pos_frac, generator=None):
    """Pick the pixels entering the loss. role (N,) -> indices (K,) long, sorted.

    Ours, not in the official code (which takes 512 random pixels of each foreground class, dropping classes with
    fewer, plus background and shuffled-pair pixels), and not Table 6: the paper's proportion of positive and
    negative samples is the official --ow_rate, the share of mismatched pairs that get a memory-bank clip
    (bank_swap's rate). Here the two anchor sets of Eq. 2, E_fg (roles >= 1, sounding pixels) and E_bg (role 0),
    are capped and balanced; roles -1 and -2 are never sampled. Exactly:
      1. every role r >= 0 keeps a uniformly random subset of min(count_r, max_anchors) pixels,
         giving F kept E_fg pixels (all classes together) and G kept E_bg pixels;
      2. with q = pos_frac / (1 - pos_frac): n_fg = min(F, round(G * q)) and
         n_bg = min(G, round(n_fg / q)) (round half up); n_fg pixels are drawn uniformly from the F
         and n_bg from the G.
    So n_fg / (n_fg + n_bg) = pos_frac up to rounding, E_fg classes keep step 1's proportions in expectation,
    and the pool is as large as the caps and the proportion allow. A batch with no E_bg (or no E_fg)
    pixel gives an empty pool: the proportion cannot be honoured and the loss is 0 for that step."""
    if max_anchors < 1:
        raise ValueError(f'loss.sample_pixels: max_anchors must be >= 1, got {max_anchors}')
    if not 0 < pos_frac < 1:
        raise ValueError(f'loss.sample_pixels: pos_frac must be in (0, 1), got {pos_frac}')
    if role.numel() and role.min() < ROLE_IGNORE:
        raise ValueError(f'loss.sample_pixels: role holds values below {ROLE_IGNORE}')
    n, device = role.numel(), role.device
    # 1. a random order, then grouped by role (stable sort keeps it random inside each role)
    order = torch.randperm(n, generator=generator, device=device)
    order = order[torch.argsort(role[order], stable=True)]              # N
    r = role[order] - ROLE_IGNORE                                       # N, shifted to 0.. for bincount
    counts = torch.bincount(r)
    first = torch.cumsum(counts, 0) - counts                            # start of each role's run
    rank = torch.arange(n, device=device) - first[r]                    # position inside its role
    kept = order[(rank < max_anchors) & (role[order] >= 0)]             # roles >= 0, capped
    fg, bg = kept[role[kept] >= 1], kept[role[kept] == 0]
    # 2. the E_fg : E_bg proportion
    q = pos_frac / (1 - pos_frac)
    n_fg = min(len(fg), math.floor(len(bg) * q + 0.5))
    n_bg = min(len(bg), math.floor(n_fg / q + 0.5))
    fg = fg[torch.randperm(len(fg), generator=generator, device=device)[:n_fg]]
    bg = bg[torch.randperm(len(bg), generator=generator, device=device)[:n_bg]]
    return torch.cat([fg, bg]).sort().values


def pixel_roles(y, a_hot, own_hot, *, size):
    """Eq. 2 on the feature lattice. y (B, H, W) long labels at full resolution; a_hot (B, C) classes of the audio
    each row was fused with; own_hot (B, C) classes of the row's image's own audio -> role (N = B*h*w,) long, with
    (h, w) = size (labels_at)."""
    B, (h, w) = y.shape[0], size
    if y.dim() != 3 or a_hot.shape[0] != B or own_hot.shape[0] != B:
        raise ValueError(f'loss.pixel_roles: y {tuple(y.shape)} must be (B, H, W) and a_hot {tuple(a_hot.shape)}, '
                         f'own_hot {tuple(own_hot.shape)} (B, C)')
    y = labels_at(y, (h, w))                                                                     # N
    image = torch.arange(B, device=y.device).repeat_interleave(h * w)                           # N: row of each pixel
    return anchor_sets(y, a_hot[image], own_hot[image])


def labels_at(y, size):
    """y (B, H, W) long labels -> (B*h*w,) on the (h, w) feature lattice, by nearest neighbour as the official code
    (no label mixing)."""
    return F.interpolate(y[:, None].float(), size=tuple(size), mode='nearest')[:, 0].long().flatten()


def gather_pixels(z, idx):
    """z (B, D, h, w), idx (K,) flat pixel indices into B*h*w -> (K, D): only the sampled pixels are gathered."""
    hw = z.shape[2] * z.shape[3]
    return z.flatten(2)[idx // hw, :, idx % hw]


def contrastive_loss(z, y, a_hot, own_hot, *, mode='cavp', tau=0.1, max_anchors=512, pos_frac=0.5,
                     generator=None):
    """The contrastive term of Eq. 5. z (B, D, h, w) fused features of all pairings, stacked along B;
    y (B, H, W) long labels at full resolution; a_hot (B, C) classes of the audio each row was fused with;
    own_hot (B, C) classes of the row's image's own audio (both unused when mode='supcon').
    mode 'cavp': pixel_roles + sample_pixels + cavp_loss. mode 'supcon': role = label, same sampling,
    supcon_loss; pass the original pairs only. Returns (loss, stats) with stats python ints:
    n_anchors / n_fg / n_bg sampled, n_unknown = E_unknown pixels seen at feature resolution."""
    B, D, h, w = z.shape
    if y.dim() != 3 or y.shape[0] != B:
        raise ValueError(f'loss.contrastive_loss: y {tuple(y.shape)} must be (B, H, W) with B = {B}')
    if mode == 'cavp':
        role = pixel_roles(y, a_hot, own_hot, size=(h, w))                                # Eq. 2
    elif mode == 'supcon':
        y = labels_at(y, (h, w))
        role = y.masked_fill(y == IGNORE, ROLE_IGNORE)
    else:
        raise ValueError(f"loss.contrastive_loss: mode must be 'cavp' or 'supcon', got {mode!r}")
    idx = sample_pixels(role, max_anchors=max_anchors, pos_frac=pos_frac, generator=generator)   # K
    z_k, role_k = gather_pixels(z, idx), role[idx]                                              # K, D; K
    loss = cavp_loss(z_k, role_k, tau) if mode == 'cavp' else supcon_loss(z_k, role_k, tau)
    stats = dict(n_anchors=len(idx), n_fg=int((role_k >= 1).sum()), n_bg=int((role_k == 0).sum()),
                 n_unknown=int((role == ROLE_UNKNOWN).sum()))
    return loss, stats


class MemoryBank:
    """App. B.1: a per-class FIFO of raw mono waveforms of single-source clips (the dataset's bank_wave /
    bank_cls), kept on CPU. Under DDP every rank keeps its own bank of its own samples: nothing is shared,
    so nothing needs to be synchronised. train.py saves the clips in its checkpoints (--bank-size per class,
    1 s each in the CPU preset) so that a single-process resume is exact; under DDP every rank restores rank
    0's bank, which then refills with the rank's own samples within a few iterations.

    Use (train.py), after pair_permutation: the permuted pairing reuses the batch's audio features, and the
    swapped rows get new audio, whose log-mel goes through the audio network:
        swap = bank_swap(perm, t, bank_cls, rate=bank_rate, stored=bank.stored(), generator=g)
        for i in swap.nonzero()[:, 0].tolist():      # the waveform really changes (the official stereo
            # trainer relabels such pairs as matched but keeps their mismatched audio)
            clip = bank.sample(bank_cls[i], generator=g)                    # (L,) mono
            wave_i = pan(clip, bank_alpha[i]) if stereo else clip          # at the image's object
        a_hot = torch.where(swap[:, None], F.one_hot(bank_cls, C).bool(), t[perm].bool())
        bank.push(bank_wave, bank_cls)      # after the swap: no image gets back the clip it came with
    """

    def __init__(self, *, num_classes=22, capacity=32):
        self.clips = [deque(maxlen=capacity) for _ in range(num_classes)]

    def push(self, waves, cls):
        """waves (B, L) mono, cls (B,) their classes; class < 1 (no single source) is skipped."""
        if waves.dim() != 2 or cls.shape != waves.shape[:1]:
            raise ValueError(f'MemoryBank.push: waves {tuple(waves.shape)} and cls {tuple(cls.shape)} '
                             f'must be (B, L) and (B,)')
        for wave, c in zip(waves.detach().cpu(), cls.tolist()):
            if c >= len(self.clips):
                raise ValueError(f'MemoryBank.push: class {c} >= num_classes {len(self.clips)}')
            if c >= 1:
                self.clips[c].append(wave.clone())    # clone: do not keep the whole batch alive

    def sample(self, cls, generator=None):
        """A random stored clip (L,) of class cls, or None when that class is empty."""
        clips = self.clips[int(cls)]
        if not clips:
            return None
        return clips[int(torch.randint(len(clips), (1,), generator=generator))]

    def stored(self):
        """(num_classes,) bool: which classes hold at least one clip."""
        return torch.tensor([len(c) > 0 for c in self.clips])


def bank_swap(perm, own_hot, bank_cls, *, rate, stored=None, generator=None):
    """App. B.1: which pairs of the permuted pairing get a bank clip. perm (B,) from pair_permutation,
    own_hot (B, C) classes of each sample's own audio, bank_cls (B,) the class of a single-source image's one
    sounding object, 0 for the others (VPODataset), rate the probability (Table 6's proportion, official --ow_rate;
    official swaps exactly int(rate x mismatched) pairs, we draw each with probability rate), stored (C,) bool
    from MemoryBank.stored() -> (B,) bool. A pair is eligible when it is mismatched (perm[i] != i and its
    audio's classes differ from the image's), the image is single-source and the bank holds a clip of its class.
    The swapped pair's audio is then a clip of class bank_cls[i], so its a_hot is onehot(bank_cls[i]): a positive
    pair made of a different audio instance. One uniform draw per row, eligible or not, so the generator stays
    in step."""
    own = own_hot.bool()
    mismatched = (perm != torch.arange(len(perm), device=perm.device)) & (own[perm] != own).any(1)
    eligible = mismatched & (bank_cls >= 1)
    if stored is not None:
        eligible &= stored.to(bank_cls.device)[bank_cls.clamp(min=0)]
    draw = torch.rand(len(perm), generator=generator, device=perm.device) < rate
    return eligible & draw


def _bench(ns, dim, repeats, tau, seed):
    """Forward + backward time of cavp_loss on random features and roles (uniform over -2..21)."""
    g = torch.Generator().manual_seed(seed)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}')
    for n in ns:
        z0 = torch.randn(n, dim, generator=g)
        role = torch.randint(ROLE_IGNORE, 22, (n,), generator=g)
        times = []
        for _ in range(repeats + 1):                  # the first run is a warm-up, not counted
            z = z0.clone().requires_grad_()
            t0 = time.perf_counter()
            cavp_loss(z, role, tau).backward()
            times.append(time.perf_counter() - t0)
        times = times[1:]
        print(f'N={n} D={dim}: median {statistics.median(times):.3f} s over {repeats} runs '
              f'(all: {", ".join(f"{t:.3f}" for t in times)})')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='loss.py: benchmark of cavp_loss')
    parser.add_argument('--bench', action='store_true', help='time forward+backward of cavp_loss')
    parser.add_argument('--n', type=int, nargs='+', default=[2048, 8192], help='numbers of pixels N')
    parser.add_argument('--dim', type=int, default=256, help='feature dimension D')
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per N (median reported)')
    parser.add_argument('--tau', type=float, default=0.1, help='temperature')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random inputs')
    args = parser.parse_args()
    if not args.bench:
        parser.error('nothing to do: pass --bench')
    _bench(args.n, args.dim, args.repeats, args.tau, args.seed)
