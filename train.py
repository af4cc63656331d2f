"""Train CAVP (Sec. 4) on VPO (Sec. 3): cross-entropy + the CAVP contrastive term (Eq. 5).

    python train.py --data vpo_ss                          # built-in source, CPU preset, 5-10 min on 2 cores
    torchrun --nproc_per_node 2 train.py --data vpo_msmi --root /data/vpo   # global batch 16: 8 per GPU, as official
    python train.py --data vpo_ss --resume runs/vpo_ss/last.pt
    python train.py --data vpo_ss --benchmark 20           # images/s, ms/step, CAVP vs --contrast none

Device, precision and distribution are decided once at the top of main(); after that one code path runs on a
laptop CPU and on N GPUs alike. The training step of Sec. 4.2 is `train_step`, read it beside the paper.
A run never overwrites another: a second run under the same --name goes to <name>-2 (then -3, ...), also when
both start at once; --resume continues in the checkpoint's own folder, unless a live process still writes there.
"""
import argparse
import contextlib
import itertools
import json
import os
import random
import sys
import time
import types

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import evaluate
import loss as L
import vpo
from model import AUDIO_BACKBONES, CAVP, IMAGE_BACKBONES, NO_IMAGENET

BENCH_WARMUP = 10   # --benchmark: untimed steps first (the memory bank fills, cudnn tunes its shapes)

# The paper's setting (App. B.1 and the official configs, e.g. config/config_vpo_ss.py) and the CPU preset used
# without a GPU: the same recipe scaled down for 2 CPU cores. Random init, ResNet-10 (ResNet-18 with one block per
# stage) for both the image branch at OS 16 and the audio branch, D = 76, AdamW at a higher lr, and everything at
# about half resolution: training crops of 64 px at scale 0.35-0.7 (a crop holds much of a 128-224 px built-in
# image), val/test images resized by 0.5 (metrics at full resolution), 0.4 s audio windows, 7 epochs validated after
# epochs 4 and 7, and a 100-step linear lr warm-up to 8e-3 (not in the paper: from random init the model otherwise
# sits 1-2 epochs predicting all background). It fits in 10 minutes on 2 cores and is not converged (README).
PRESETS = {
    'paper': dict(backbone='resnet50', output_stride=8, crop=512, scale=(0.5, 2.0), batch_size=16, epochs=80,
                  lr=1e-3, weight_decay=5e-4, head_lr_mult=10.0, audio_seconds=3.0, balance=0.0, test_scale=1.0,
                  max_anchors=512, eval_every=1, workers=8, optimizer='sgd', dim=304, warmup_steps=0,
                  audio_backbone='resnet18'),
    'cpu': dict(backbone='resnet10', audio_backbone='resnet10', output_stride=16, crop=64, scale=(0.35, 0.7),
                batch_size=16, epochs=7, optimizer='adamw', lr=8e-3, weight_decay=1e-4, head_lr_mult=1.0,
                audio_seconds=0.4, max_anchors=256, eval_every=4, workers=1, dim=76, balance=0.0, test_scale=0.5,
                warmup_steps=100),
}
# Where one CPU preset does not fit a subset's built-in miniature (data.BUILTIN_SIZE), these values replace it.
# VPO-MS: batches of 32 at half the lr (fewer, less noisy steps, same epochs) learn to follow the audio of a
# mixture: seed 0, 8 epochs, batch 16 / lr 8e-3 -> 32 / 8e-3 -> 32 / 4e-3: cf_miou 0.32 -> 0.37 -> 0.41, silence
# 0.085 -> 0.068 -> 0.035, mIoU 0.49 -> 0.49 -> 0.50. Not for VPO-MSMI (at scale 0.35): at 32 its stereo was
# learned by one seed of three (mIoU 0.58, 0.29, 0.32; stereo_acc 0.92, 0.50, 0.56), at 16 by all three (0.76).
# VPO-MSMI's cue is alpha = c_w / W, the position in the full image (as official), so a crop should hold the
# image's width: a 64 px crop at scale 0.35-0.7 of a 128-224 px image often shows one instance only, or one side,
# and the pan then disagrees with the picture. An 80 px crop at a fixed scale 0.45 holds images up to 178 px wide
# whole and cuts at most 21 px off wider ones. At 0.35 (every image whole) the shapes and textures are too small
# to see: the model names objects by hue alone (bird as bus, zebra as car, tennis racket as cow), and seeds 0-2
# reach mIoU 0.39 / 0.38 / 0.34; at 0.45, 0.44 / 0.52 / 0.61 in the same time (0.55, cutting up to 43 px: seed 0, 0.31).
CPU_SUBSET = {'vpo_ms': dict(batch_size=32, lr=4e-3, epochs=8),
              'vpo_msmi': dict(crop=80, scale=(0.45, 0.45), test_scale=0.45, epochs=7)}
# A resumed run takes every argument from its checkpoint but those typed on the command line; a note names those
# that change what is computed (not the bookkeeping ones). The ARCH ones are always the checkpoint's.
BOOKKEEPING = ('name', 'out', 'resume', 'workers', 'vis', 'no_probes', 'test_only', 'benchmark', 'compile', 'protocol',
               'test_batch')
ARCH = ('data', 'backbone', 'output_stride', 'dim', 'attn', 'heads', 'mono', 'audio_seconds', 'audio_backbone',
        'resize')   # define the network and its input: always the checkpoint's


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument('--data', default='vpo_ss', choices=data.VPO_SUBSETS + data.AVSBENCH,
                   help='benchmark: VPO subset (Sec. 3) or AVSBench s4 / ms3 / avss (Tables 1-3)')
    p.add_argument('--root', default=None, help='VPO folder from vpo.py, the official release, or an AVSBench '
                   'release; default: the built-in offline source, generated into data/ on first use')
    p.add_argument('--data-seed', type=int, default=0, help='seed of the built-in offline source (not of training)')
    p.add_argument('--resize', type=int, default=None, help='AVSBench: frames resized to N x N (Tables 1-2: 224); '
                   'default original size (Table 3)')
    p.add_argument('--preset', default='auto', choices=['auto', 'paper', 'cpu'],
                   help="defaults for unset flags: 'paper' = App. B.1; 'cpu' = small demo; auto = cpu without CUDA")
    p.add_argument('--crop', type=int, default=None, help='train crop size (paper 512)')
    p.add_argument('--scale', type=float, nargs=2, default=None, metavar=('MIN', 'MAX'),
                   help='random scale range of training images (paper 0.5 2.0)')
    p.add_argument('--test-scale', type=float, default=None,
                   help='VPO: val/test images resized by this factor, metrics at original resolution (paper 1)')
    p.add_argument('--audio-seconds', type=float, default=None,
                   help='audio window in seconds (App. B.1: VPO 3, AVSBench 1; CPU preset 0.4)')
    p.add_argument('--mono', action='store_true', help='mono audio, one log-mel plane (Fig. 7 / Table 8 ablation)')
    p.add_argument('--workers', type=int, default=None, help='data loader processes per GPU/process')
    p.add_argument('--balance', type=float, default=None, metavar='POWER', help='class-balanced sampling: weight '
                   'n_c^-POWER of a sample\'s rarest sounding class (paper 0 = uniform)')
    # model
    p.add_argument('--backbone', default=None, choices=IMAGE_BACKBONES,
                   help='image backbone (paper resnet50; resnet10 = ResNet-18 with one block per stage)')
    p.add_argument('--output-stride', type=int, default=None, choices=[8, 16], help='backbone output stride (paper 8)')
    p.add_argument('--dim', type=int, default=None, help='fused feature width D (official 304 = 256 ASPP + 48 low)')
    p.add_argument('--attn', default='sigmoid', choices=['sigmoid', 'softmax', 'minmax', 'channel', 'tpavi'],
                   help='f_CA activation / variant (Sec. 4.1, Fig. 6, Table 5)')
    p.add_argument('--heads', type=int, default=4, help='attention heads of f_CA')
    p.add_argument('--weights', default='auto', help="image backbone init: 'imagenet' (torchvision's, fetched once "
                   "into the hub cache), a path, 'none'; auto = imagenet on real data, none on the built-in source")
    p.add_argument('--audio-backbone', default=None, choices=AUDIO_BACKBONES,
                   help='audio branch: resnet18 (VPO), vggish (AVSBench), resnet10 (lighter); default by --data')
    p.add_argument('--audio-weights', default='auto', help="audio init: 'imagenet' (ResNet-18, conv1 re-initialised, "
                   "as official), 'vggish' (torchvggish's), both fetched once into the hub cache; a path; 'none'; auto"
                   " = imagenet for resnet18 on real data, vggish for vggish, else none")
    p.add_argument('--freeze-audio', action='store_true', help='do not train the audio branch (AVSBench: VGGish)')
    # loss (Sec. 4.2)
    p.add_argument('--contrast', default='cavp', choices=['none', 'supcon', 'cavp'], help='contrastive term (Table 5)')
    p.add_argument('--cavp-weight', type=float, default=1.0, help='lambda of Eq. 5')
    p.add_argument('--tau', type=float, default=0.1, help='temperature of Eq. 4')
    p.add_argument('--max-anchors', type=int, default=None, help='sampled pixels per role (official 512)')
    p.add_argument('--pos-frac', type=float, default=0.5, help='E_fg share of the sampled pixels (ours; not official)')
    p.add_argument('--bank-rate', type=float, default=0.5, help='chance that a mismatched pair of a single-source '
                   'image hears a bank clip of its class (App. B.1; Table 6\'s proportion, official --ow_rate 0.5)')
    p.add_argument('--bank-size', type=int, default=8, help='memory bank clips per class')
    # optimisation (App. B.1)
    p.add_argument('--epochs', type=int, default=None, help='epochs (paper 80)')
    p.add_argument('--batch-size', type=int, default=None, help='global batch size (paper 16), split over processes')
    p.add_argument('--optimizer', default=None, choices=['sgd', 'adamw'], help='optimizer (paper SGD)')
    p.add_argument('--lr', type=float, default=None, help='base learning rate (paper 1e-3), not scaled by GPU count')
    p.add_argument('--head-lr-mult', type=float, default=None, help='lr factor of ASPP, reduce and head (official 10)')
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    p.add_argument('--weight-decay', type=float, default=None, help='weight decay, not on norms/biases (paper 5e-4)')
    p.add_argument('--poly-power', type=float, default=0.9, help='poly decay (1 - it/total)^power')
    p.add_argument('--grad-clip', type=float, default=0.0, help='clip grad norm (0 = off)')
    p.add_argument('--warmup-steps', type=int, default=None, help='linear lr warm-up over the first N steps (paper 0)')
    # run
    p.add_argument('--name', default=None, help='run folder under --out (default --data); a taken name gets -2, -3')
    p.add_argument('--out', default='runs', help='where run folders go')
    p.add_argument('--seed', type=int, default=0, help='seed of init, sample order, augmentation and pairing')
    p.add_argument('--resume', default=None, help="checkpoint to continue from (last.pt), in its own folder, with its "
                   "own arguments (flags given explicitly override, with a note)")
    p.add_argument('--eval-every', type=int, default=None, help='validate every N epochs (and at the last)')
    p.add_argument('--compile', action='store_true', help='torch.compile the network (CUDA)')
    p.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'fp32'], help='autocast dtype (auto: '
                   'on CUDA bf16 if supported, else fp16 + GradScaler; on a CPU fp32, bf16 allowed; official fp32)')
    p.add_argument('--channels-last', default='auto', choices=['auto', 'on', 'off'], help='auto: on with CUDA')
    p.add_argument('--benchmark', type=int, default=0, help=f'time N steps after {BENCH_WARMUP} warm-up steps, '
                   'alternating the chosen --contrast with --contrast none, print images/s and the ratio, and exit')
    p.add_argument('--vis', type=int, default=8, help='test pictures to write to runs/<name>/vis')
    p.add_argument('--no-probes', action='store_true', help='skip the audio probes on test')
    p.add_argument('--protocol', default='cavp', choices=evaluate.PROTOCOLS, help=evaluate.PROTOCOL_HELP)
    p.add_argument('--test-batch', type=int, default=None, metavar='N', help=evaluate.TEST_BATCH_HELP)
    p.add_argument('--test-only', action='store_true', help='evaluate --resume on test and exit')
    p.add_argument('--max-steps', type=int, default=0, help='stop each epoch after N steps (smoke tests)')
    p.add_argument('--limit', type=int, default=0, help='use only the first N samples of each split (smoke tests)')
    return p


# flag -> (test, what it must be); checked at parse time so that a bad value never reaches the maths
RANGES = {
    'crop': (lambda v: v >= 8, '>= 8'), 'scale': (lambda v: 0 < v[0] <= v[1], 'MIN MAX with 0 < MIN <= MAX'),
    'test_scale': (lambda v: 0 < v <= 4, 'in (0, 4]'), 'audio_seconds': (lambda v: 0 < v <= 60, 'in (0, 60] s'),
    'workers': (lambda v: v >= 0, '>= 0'), 'balance': (lambda v: v >= 0, '>= 0'), 'resize': (lambda v: v >= 8, '>= 8'),
    'dim': (lambda v: v >= 7, '>= 7'), 'heads': (lambda v: v >= 1, '>= 1'), 'cavp_weight': (lambda v: v >= 0, '>= 0'),
    'tau': (lambda v: v > 0, '> 0'), 'max_anchors': (lambda v: v >= 1, '>= 1'),
    'pos_frac': (lambda v: 0 < v < 1, 'in (0, 1)'), 'bank_rate': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'bank_size': (lambda v: v >= 1, '>= 1'), 'epochs': (lambda v: v >= 1, '>= 1'),
    'batch_size': (lambda v: v >= 2, '>= 2'), 'lr': (lambda v: v > 0, '> 0'), 'head_lr_mult': (lambda v: v > 0, '> 0'),
    'momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'), 'weight_decay': (lambda v: v >= 0, '>= 0'),
    'poly_power': (lambda v: v >= 0, '>= 0'), 'grad_clip': (lambda v: v >= 0, '>= 0'),
    'warmup_steps': (lambda v: v >= 0, '>= 0'), 'eval_every': (lambda v: v >= 1, '>= 1'),
    'benchmark': (lambda v: v >= 0, '>= 0'), 'vis': (lambda v: v >= 0, '>= 0'), 'max_steps': (lambda v: v >= 0, '>= 0'),
    'limit': (lambda v: v >= 0, '>= 0'), 'test_batch': (lambda v: v >= 1, '>= 1 videos'),
}


def get_args(argv=None):
    """Parsed arguments with the preset's values filled in and every number checked. With --resume the checkpoint's
    arguments replace those not given explicitly (its schedule, data and model), so a bare --resume continues the
    same run."""
    p = get_parser()
    args = p.parse_args(argv)
    given = set(vars(quiet_parser(p).parse_args(argv)))   # the flags typed on the command line
    args.preset = args.preset if args.preset != 'auto' else ('paper' if torch.cuda.is_available() else 'cpu')
    if args.data in data.AVSBENCH:   # AVSBench: mono 1 s VGGish examples (App. B.1, following [63])
        args.audio_backbone = args.audio_backbone or 'vggish'
        args.mono, args.audio_seconds = True, 0.975
        args.test_scale = args.test_scale or 1.0   # frames are evaluated at --resize or original size
    for k, v in preset_values(args.preset, args.data).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.ckpt = None
    if args.resume:
        args.ckpt = evaluate.read_checkpoint(args.resume, flag='--resume')
        for k, v in args.ckpt['args'].items():
            mine = getattr(args, k, v)
            if k in given and k not in ARCH:   # typed on the command line: it wins
                if mine != v and k not in BOOKKEEPING:
                    print(f'note: --{k.replace("_", "-")} {mine!r} overrides the checkpoint\'s {v!r}')
                continue
            if k in given and mine != v:
                print(f'note: --resume keeps the checkpoint\'s {k}={v!r} (command line said {mine!r})')
            setattr(args, k, tuple(v) if isinstance(v, list) else v)
    for k, (ok, want) in RANGES.items():
        v = getattr(args, k)
        if v is not None and not ok(v):
            p.error(f'--{k.replace("_", "-")} {v}: expected {want}')
    if args.protocol == 'cavp' and 'test_batch' not in given:
        args.test_batch = None   # a resumed avsbench run's test batch, not asked for again
    try:
        args.test_batch = evaluate.resolve_test_batch(args.protocol, args.test_batch, args.data)
    except ValueError as e:
        p.error(str(e))
    return args


def preset_values(preset, subset):
    """The preset's values for --data subset: PRESETS, with CPU_SUBSET's changes on the CPU."""
    return {**PRESETS[preset], **(CPU_SUBSET.get(subset, {}) if preset == 'cpu' else {})}


def quiet_parser(p):
    """A copy of parser p whose flags have no defaults: parsing argv with it gives only the flags typed."""
    q = argparse.ArgumentParser(argument_default=argparse.SUPPRESS, add_help=False)
    for a in p._actions:
        if a.option_strings and not isinstance(a, argparse._HelpAction):
            kw = dict(dest=a.dest, nargs=a.nargs) if a.nargs is not None else dict(dest=a.dest)
            if isinstance(a, argparse._StoreTrueAction):
                kw = dict(dest=a.dest, action='store_true')
            q.add_argument(*a.option_strings, **kw)
    return q


# ------------------------------------------------------------------------------------- the training step (Sec. 4.2)

class Forward(torch.nn.Module):
    """The network on both pairings in one forward (what DDP wraps and --compile compiles): the image branch runs
    once, the audio branch once over the batch's B clips and the k memory-bank clips, f_CA once per pairing.
    Tensors in and out only: a (B + k, A, T, F) varies in its first dim, which torch.compile makes dynamic after
    one recompile."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, a, src=None):
        m, B = self.model, x.shape[0]
        u_v = m.forward_image(x)['u_v']               # B, D, H/4, W/4    u_v = f_phi(x)
        u_a = m.forward_audio(a)                      # B + k, D          u_a = f_gamma(a), bank clips included
        z, _ = m.fuse(u_v, u_a[:B])                   # B, D, h, w        f_CA with each image's own audio
        logits = m.classify(z, x.shape[-2:])          # B, C, H, W
        z_perm = None if src is None else m.fuse(u_v, u_a[src])[0]   # B, D, h, w  f_CA with the audio src[i]
        return logits, z, z_perm


def bank_audio(bank, batch, rows, dataset, *, mono, device, generator):
    """Log-mel (k, A, T, F) of one memory-bank clip of class bank_cls[i] per swapped row i, panned at the position of
    row i's object (App. B.1); None when no row is swapped."""
    if not len(rows):
        return None
    waves = []
    for i in rows.tolist():
        clip = bank.sample(int(batch['bank_cls'][i]), generator=generator).numpy()
        alpha = float(batch['bank_alpha'][i])
        waves.append(clip[None] if mono else vpo.pan(clip, alpha, sr=data.SR, itd=getattr(dataset, 'itd', False)))
    return dataset.audio_transform(torch.from_numpy(np.stack(waves)).float().to(device))


def cudnn_fixed_shapes(a_bank):
    """cudnn.benchmark re-tunes every conv for each new batch size: cycle the k bank clips up to a power of two (at
    most log2(B) + 1 shapes). The copies are never paired with an image; they only re-weigh some clips in the audio
    BatchNorm's statistics of that pass."""
    if a_bank is None or not torch.backends.cudnn.benchmark:
        return a_bank
    return a_bank[torch.arange(1 << (len(a_bank) - 1).bit_length()) % len(a_bank)]


def train_step(net, batch, args, env, *, contrast, bank, dataset, step):
    """Eq. 5's loss for one batch, in the order of Sec. 4.2. Returns (loss, ce, l_cp)."""
    device, amp_dtype = env.device, env.amp_dtype
    x = batch['image'].to(device, non_blocking=True)                    # B, 3, H, W
    a, y, t = batch['audio'].to(device), batch['label'].to(device), batch['t'].to(device)   # B,A,T,F; B,H,W; B,C
    if env.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seed = args.seed * 1_000_003 + step * env.world + env.rank   # pairing, bank and sampling: a function of the step
    gen, gen_dev = torch.Generator().manual_seed(seed), torch.Generator(device).manual_seed(seed)
    B, C = t.shape
    src = None
    if contrast == 'cavp':
        # 1. Eq. 1: a random audio-visual pairing inside the batch; image i hears the audio of sample perm[i]
        perm = L.pair_permutation(B, generator=gen)
        a_hot = t[perm.to(device)].bool()                                                       # B, C
        # 2. App. B.1: some mismatched pairs hear a bank clip of the image's own class instead (a new positive)
        swap = L.bank_swap(perm, batch['t'], batch['bank_cls'], rate=args.bank_rate, stored=bank.stored(),
                           generator=gen)                                                       # B
        rows = swap.nonzero()[:, 0]                                                             # k
        a_bank = bank_audio(bank, batch, rows, dataset, mono=args.mono, device=device, generator=gen)   # k,A,T,F
        src = perm.clone()
        src[rows] = B + torch.arange(len(rows))        # B: index of the audio token image i is fused with
        a_hot[swap.to(device)] = F.one_hot(batch['bank_cls'][rows], C).bool().to(device)
        bank.push(batch['bank_wave'], batch['bank_cls'])   # after the swap: no image gets back the clip it brought
        a = a if a_bank is None else torch.cat([a, cudnn_fixed_shapes(a_bank)])                 # B + k, A, T, F
        src = src.to(device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        # 3. forward: image branch once, audio branch once, f_CA for the original and the permuted pairing
        logits, z, z_perm = net(x, a, src)
    # the losses in fp32 with autocast off: under it (z / tau) @ z.T would run in bf16, whose spacing near 1 / tau
    # = 10 is 0.0625, coarse next to the differences between similarities that the InfoNCE terms weigh
    ce = F.cross_entropy(logits.float(), y, ignore_index=255)                  # Eq. 5: CE on the original pairs
    l_cp = torch.zeros((), device=device)
    if contrast == 'cavp':   # Z = the original pairs and the permuted ones, stacked: 2B, D, h, w
        z_all, hot = torch.cat([z, z_perm]).float(), torch.cat([t, a_hot.float()])
        # 4. Eq. 2: every pixel's role in its pairing (E_fg class c, E_bg, E_unknown, ignore)
        role = L.pixel_roles(torch.cat([y, y]), hot, torch.cat([t, t]), size=z.shape[-2:])        # N = 2B h w
        # 5. sample up to max_anchors pixels per role, E_fg : E_bg = pos_frac (ours, not in the official code)
        idx = L.sample_pixels(role, max_anchors=args.max_anchors, pos_frac=args.pos_frac, generator=gen_dev)
        # 6. Eqs. 3-4: InfoNCE of each sampled anchor against its positives and negatives
        l_cp = L.cavp_loss(L.gather_pixels(z_all, idx), role[idx], args.tau)
    elif contrast == 'supcon':   # Table 5's baseline: labels as classes, original pairs only
        l_cp, _ = L.contrastive_loss(z.float(), y, t, t, mode='supcon', tau=args.tau,
                                     max_anchors=args.max_anchors, pos_frac=args.pos_frac, generator=gen_dev)
    return ce + args.cavp_weight * l_cp, ce, l_cp                                  # 7. Eq. 5


# ------------------------------------------------------------------------------------- schedule, sampling, state

def poly_lr(args, step, total):
    warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0   # not in the paper (default 0)
    return warm * args.lr * (1 - min(step, total - 1) / total) ** args.poly_power   # App. B.1


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that yields (epoch, index): each sample's augmentation is a pure function of (seed, epoch,
    index), whatever the worker count, and again after a resume. With `weights` an epoch is len(dataset) draws with
    replacement (torch.multinomial seeded by seed + epoch, the same on every rank, then dealt out by rank) instead
    of a permutation."""

    def __init__(self, dataset, *, weights=None, **kw):
        super().__init__(dataset, **kw)
        self.weights = weights

    def __iter__(self):
        if self.weights is None:
            return ((self.epoch, i) for i in super().__iter__())
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g).tolist()
        return ((self.epoch, i) for i in draws[self.rank:self.total_size:self.num_replicas])


def balance_weights(dataset, power):
    """Per-sample draw weights that even out the sounding classes: a class seen in n_c training samples gets
    n_c ** -power (0 = uniform, the paper; 1 = every class equally often), and a sample takes the largest weight
    among its sounding classes (repeat-factor sampling, as LVIS does for rare classes). None when power is 0 or the
    dataset has no VPO rows (AVSBench: uniform). Not in the paper: on the built-in source some classes sound in 4x
    fewer samples than others, and their per-class mIoU reads 0 after a short CPU run."""
    rows = getattr(dataset, 'rows', None)
    if not power or not rows or 'objects' not in rows[0]:
        return None
    sounding = [{o['cls'] for o in r['objects'] if o['sounding']} for r in rows]
    counts = {}
    for s in sounding:
        for c in s:
            counts[c] = counts.get(c, 0) + 1
    w = [max((counts[c] ** -power for c in s), default=0.0) for s in sounding]
    mean = sum(w) / max(sum(1 for x in w if x), 1)
    return torch.tensor([x or mean for x in w], dtype=torch.float64)   # no sounding class: an average draw


def save_atomic(obj, path):
    """torch.save through evaluate.write_whole: a crash mid-write leaves the previous checkpoint intact."""
    evaluate.write_whole(path, lambda tmp: torch.save(obj, tmp))


def rng_state():
    """Every RNG's state as tensors and plain values, so that checkpoints load with weights_only=True."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'python': random.getstate(), 'numpy': [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    version, state, gauss = s['python']
    random.setstate((version, tuple(state), gauss))
    keys, pos, has_gauss, cached = s['numpy']
    np.random.set_state(('MT19937', keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s['torch'])
    if s['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s['cuda'])


@torch.no_grad()
def validate(model, dataset, env):
    """Dataset-level mIoU on this rank's share of the split; confusion matrices summed over ranks."""
    model.eval()
    C, device = dataset.num_classes, env.device
    conf = torch.zeros(C, C, dtype=torch.int64, device=device)
    amp = lambda: torch.autocast(device.type, dtype=env.amp_dtype, enabled=env.amp_dtype is not None)  # noqa: E731
    for i in range(env.rank, len(dataset), env.world):
        s = dataset[i]
        label = s['label'][None].to(device)
        run = evaluate.runner(model, s['image'][None].to(device), amp, label.shape[-2:])
        logits, _ = run(s['audio'][None].to(device))
        conf += evaluate.confusion_matrix(logits.argmax(1), label, C)
    if env.world > 1:
        dist.all_reduce(conf)
    model.train()
    return evaluate.semantic_scores(conf.cpu())


# ------------------------------------------------------------------------------------- set-up

def setup(args):
    """Device, precision and distribution, decided once."""
    ddp = 'RANK' in os.environ
    if ddp:
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    cuda = torch.cuda.is_available()
    device = torch.device(f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}' if cuda else 'cpu')
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # official: fp32 (README)
    amp_dtype = None
    if cuda and args.amp != 'fp32':
        bf16 = args.amp == 'bf16' or (args.amp == 'auto' and torch.cuda.is_bf16_supported())
        amp_dtype = torch.bfloat16 if bf16 else torch.float16
    elif args.amp == 'bf16':   # CPU autocast: the mixed-precision path of a GPU run, on a CPU
        amp_dtype = torch.bfloat16
    elif args.amp == 'fp16':
        raise ValueError('--amp fp16 needs CUDA (its GradScaler); on a CPU use --amp bf16 or fp32')
    # per rank, as official (seed + rank): no two ranks draw the same numbers; DDP copies rank 0's initial weights
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    master = rank == 0
    return types.SimpleNamespace(ddp=ddp, rank=rank, world=world, cuda=cuda, device=device, amp_dtype=amp_dtype,
                                 channels_last=args.channels_last == 'on' or (args.channels_last == 'auto' and cuda),
                                 master=master, say=print if master else (lambda *a, **k: None))


def continues(args):
    """Whether this run writes into the checkpoint's folder: --resume does (--test-only and --benchmark do not)."""
    return bool(args.resume) and not args.test_only and not args.benchmark


def run_folder(args, env, held):
    """Where this run writes, with its one writer: rank 0 holds the folder's lock (evaluate.claim_folder /
    hold_folder) until main ends, entered into `held`. --resume continues in the checkpoint's own folder and stops
    with one line when a live process still holds it; otherwise a new folder is claimed: --out/--name, or the first
    free <name>-2, -3, ... (runs started at once with one --name get distinct folders). Under torchrun rank 0
    chooses and sends its choice, or its error, to the others."""
    path = error = None
    if env.master:
        try:
            if continues(args):
                path = os.path.dirname(os.path.abspath(args.resume))
                lock = evaluate.hold_folder(path, f'--resume {args.resume}')
            else:
                path, lock = evaluate.claim_folder(os.path.join(args.out, args.name or args.data))
            held.callback(os.close, lock)
        except (OSError, ValueError) as e:
            if not env.ddp:
                raise
            error = str(e)
    if env.ddp:   # every rank writes where rank 0 chose, or stops with rank 0's error
        box = [path, error]
        dist.broadcast_object_list(box, src=0)
        path, error = box
        if error:
            raise ValueError(error)
    return path


def build_splits(args, progress):
    """(source kind, [train, val, test] datasets) for --data / --root: the kind from data.resolve_root
    ('avsbench' for AVSBench)."""
    source = 'avsbench' if args.data in data.AVSBENCH else \
        data.resolve_root(args.data, args.root, data_seed=args.data_seed, progress=progress)[1]
    return source, [data.build_dataset(args.data, args.root, split, train=split == 'train', crop=args.crop,
                                       scale=args.scale, audio_seconds=args.audio_seconds, mono=args.mono,
                                       seed=args.seed, data_seed=args.data_seed, resize=args.resize,
                                       test_scale=args.test_scale, progress=progress)
                    for split in ('train', 'val', 'test')]


def resolve_weights(args, source):
    """--weights / --audio-weights 'auto', decided from the source kind (data.resolve_root), in place. ImageNet
    features do not transfer to the built-in source's generated shapes, and torchvision has no ImageNet resnet10:
    random init there; on real data torchvision's ImageNet trunks and torchvggish's VGGish (model.hub_file)."""
    if args.weights == 'auto':
        args.weights = 'none' if source == 'builtin' or args.backbone in NO_IMAGENET else 'imagenet'
    if args.audio_weights == 'auto':
        args.audio_weights = 'vggish' if args.audio_backbone == 'vggish' else \
            'imagenet' if source not in ('builtin', 'avsbench') and args.audio_backbone == 'resnet18' else 'none'


def make_data(args, env):
    """The three splits and the training loader. Rank 0 builds them first, so that everything derived on disk (the
    built-in source, the official release's remapped masks) is written once; the other ranks then only read it."""
    per_rank = per_process_batch(args.batch_size, env.world, args.contrast)   # before any work
    if env.master:
        source, splits = build_splits(args, progress=True)
    if env.ddp:
        dist.barrier()
    if not env.master:
        source, splits = build_splits(args, progress=False)
    resolve_weights(args, source)
    for ds, split in zip(splits, ('train', 'val', 'test')):
        if args.limit:
            ds.rows = ds.rows[:args.limit]
        if not len(ds):   # found now, not after an epoch of training
            raise ValueError(f'--data {args.data} (--root {args.root or "built-in"}): the {split} split is empty')
    train_set = splits[0]
    sampler = EpochSampler(train_set, weights=balance_weights(train_set, args.balance), num_replicas=env.world,
                           rank=env.rank, shuffle=True, seed=args.seed, drop_last=True)
    # its own generator: the workers' base seed is then not drawn from the global RNG, so a resumed run draws the
    # same numbers from it as an uninterrupted one
    loader = torch.utils.data.DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=args.workers,
                                         pin_memory=env.cuda, drop_last=True, persistent_workers=args.workers > 0,
                                         prefetch_factor=4 if args.workers > 0 else None,
                                         generator=torch.Generator().manual_seed(args.seed))
    if len(loader) == 0:
        raise ValueError(f'{args.data} train has {len(train_set)} samples: fewer than one batch of {per_rank}')
    return splits, sampler, loader


MIN_PAIRING_BATCH = 4   # per process, for --contrast cavp (official: 8 per GPU)


def per_process_batch(batch_size, world, contrast):
    """--batch-size (global) split over `world` processes. Eq. 1 pairs the samples of one process's batch: at 2 a
    permutation is the identity half the time and the step mines nothing, at 4 one time in 24 (a quarter of the
    pairs stay matched on average at any size), so CAVP asks for >= MIN_PAIRING_BATCH per process."""
    per, least = batch_size // world, MIN_PAIRING_BATCH if contrast == 'cavp' else 2
    if per * world != batch_size:
        raise ValueError(f'--batch-size {batch_size} does not split evenly over {world} processes')
    if per < least:
        raise ValueError(f'--batch-size {batch_size} over {world} processes leaves {per} per process; ' +
                         (f"--contrast cavp pairs inside each process's batch (Eq. 1) and needs >= {least} "
                          f'(official: 8 per GPU): raise --batch-size or use fewer processes'
                          if contrast == 'cavp' else f'BatchNorm needs >= {least}'))
    return per


def make_model(args, env, num_classes):
    """CAVP, its optimizer (param_groups) and the AMP grad scaler."""
    args.num_classes = num_classes
    model = CAVP(num_classes=num_classes, backbone=args.backbone, output_stride=args.output_stride,
                 audio_channels=1 if args.mono else 2, attn=args.attn, heads=args.heads, dim=args.dim,
                 audio_backbone=args.audio_backbone, freeze_audio=args.freeze_audio,
                 weights=None if args.weights == 'none' else args.weights,
                 audio_weights=None if args.audio_weights == 'none' else args.audio_weights).to(env.device)
    if env.channels_last:
        model.to(memory_format=torch.channels_last)
    groups = param_groups(model, head_lr_mult=args.head_lr_mult, weight_decay=args.weight_decay)
    # fused: one kernel over all parameters (CPU and CUDA); a per-tensor loop costs ~80 ms a step on 2 CPU cores
    if args.optimizer == 'sgd':
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, fused=True)
    else:
        opt = torch.optim.AdamW(groups, lr=args.lr, fused=True)
    scaler = torch.amp.GradScaler('cuda', enabled=env.amp_dtype == torch.float16)
    return model, opt, scaler


def param_groups(model, *, head_lr_mult, weight_decay):
    """Optimizer groups as the official trainer makes them (`main_vpo_stereo.py` set_group_lr, group_weight): the
    segmentation head (ASPP, layer1 reduce, head convs and classifier) at lr x head_lr_mult, everything else (image
    backbone, audio branch, f_CA) at lr; no weight decay on 1-d parameters (norm weights and biases). Each group's
    'mult' is read by the lr schedule. Frozen parameters (--freeze-audio) are left out."""
    head = {id(q) for m in (model.aspp, model.reduce, model.head) for q in m.parameters()}
    groups = {}
    for q in model.parameters():
        if q.requires_grad:
            key = (head_lr_mult if id(q) in head else 1.0, weight_decay if q.ndim > 1 else 0.0)
            groups.setdefault(key, []).append(q)
    return [{'params': qs, 'mult': mult, 'weight_decay': wd} for (mult, wd), qs in sorted(groups.items())]


def wrap(model, args, env):
    """The Forward module, under DDP (SyncBatchNorm on GPUs) and torch.compile when asked."""
    net = Forward(model)
    if env.ddp:
        if env.cuda:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[env.device.index] if env.cuda else None)
    return torch.compile(net) if args.compile else net


# ------------------------------------------------------------------------------------- the loop

def optimize(loss, opt, scaler, model, args):
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(opt)
    scaler.update()


def train_one_epoch(epoch, net, model, loader, opt, scaler, bank, state, args, env, *, steps, total, record):
    model.train()
    bar = tqdm(itertools.islice(loader, steps), total=steps, desc=f'epoch {epoch + 1}/{args.epochs}',
               disable=not env.master, dynamic_ncols=True, file=sys.stdout)
    t0, seen = time.perf_counter(), 0
    for it, batch in enumerate(bar):
        lr = poly_lr(args, state['step'], total)
        for g in opt.param_groups:
            g['lr'] = lr * g['mult']
        loss, ce, l_cp = train_step(net, batch, args, env, contrast=args.contrast, bank=bank,
                                    dataset=loader.dataset, step=state['step'])
        if not torch.isfinite(loss):
            raise FloatingPointError(f'non-finite loss at step {state["step"]} (epoch {epoch + 1}): ce={ce.item()} '
                                     f'contrast={l_cp.item()}; batch samples {batch["index"].tolist()}')
        optimize(loss, opt, scaler, model, args)
        state['step'] += 1
        seen += len(batch['image']) * env.world
        if env.master and (it % 10 == 0 or it == steps - 1):
            ips = seen / (time.perf_counter() - t0)
            bar.set_postfix(ce=f'{ce.item():.3f}', cl=f'{l_cp.item():.3f}', lr=f'{lr:.2e}', ips=f'{ips:.1f}')
            record(kind='step', epoch=epoch + 1, step=state['step'], ce=ce.item(), contrast=l_cp.item(), lr=lr,
                   images_per_s=ips)
    bar.close()


def main(argv=None):
    """Train, validate and test one run (--test-only: test; --benchmark: time steps). Returns the test metrics."""
    with contextlib.ExitStack() as held:   # the run folder's lock, let go when main returns or raises
        return run_main(get_args(argv), held)


def run_main(args, held):
    ckpt = vars(args).pop('ckpt')
    # 1. device, precision, distribution; a --resume of a run whose trainer is alive stops here, before any work
    env = setup(args)
    say = env.say
    run_dir = run_folder(args, env, held) if continues(args) else None
    # 2. data
    (train_set, val_set, test_set), sampler, loader = make_data(args, env)
    steps = min(args.max_steps or len(loader), len(loader))
    # 3. model, optimizer, memory bank (App. B.1)
    model, opt, scaler = make_model(args, env, train_set.num_classes)
    bank = L.MemoryBank(num_classes=train_set.num_classes, capacity=args.bank_size)
    state = dict(epoch=0, step=0, best=-1.0, best_epoch=-1, val_pending=False)
    # 4. resume: weights, optimizer, bank, loop state and every RNG
    if ckpt is not None:
        restore(ckpt, model, opt, scaler, bank, state)
    net = wrap(model, args, env)
    change = ', '.join(f'{k} {v}' for k, v in CPU_SUBSET.get(args.data, {}).items()
                       if args.preset == 'cpu' and getattr(args, k) == v)   # the subset's changes in effect
    change = f' ({args.data}: {change})' if change else ''
    say(f'cavp | {args.data} | preset {args.preset}{change} | {env.device} x{env.world} | amp {env.amp_dtype} | '
        f'channels_last {env.channels_last} | {sum(q.numel() for q in model.parameters()) / 1e6:.1f} M params | '
        f'train/val/test {len(train_set)}/{len(val_set)}/{len(test_set)} | {steps} steps x {args.epochs} epochs')
    say('args: ' + json.dumps(vars(args), sort_keys=True))
    if args.benchmark:
        return benchmark(net, model, sampler, loader, opt, scaler, bank, args, env)
    run_dir = run_dir or run_folder(args, env, held)   # claimed now: a run that fails before writes no folder
    say(f'run folder: {run_dir}')
    log = open(os.path.join(run_dir, 'log.jsonl'), 'a') if env.master else None
    record = (lambda **kv: (log.write(json.dumps(kv) + '\n'), log.flush())) if log else (lambda **kv: None)

    def save(name):
        if env.master:
            save_atomic({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'scaler': scaler.state_dict(),
                         **state, 'args': vars(args), 'rng': rng_state(), 'bank': [list(c) for c in bank.clips]},
                        os.path.join(run_dir, name))

    def validate_and_select():   # on val, never on test
        v = validate(model, val_set, env)
        state['val_pending'] = False
        if v['miou'] > state['best']:
            state['best'], state['best_epoch'] = v['miou'], state['epoch']
            save('best.pt')
        save('last.pt')
        say(f'epoch {state["epoch"]}: val mIoU {v["miou"]:.4f} F {v["fbeta"]:.4f} FDR {v["fdr"]:.4f} '
            f'(best {state["best"]:.4f} @ {state["best_epoch"]})')
        record(kind='val', epoch=state['epoch'], miou=v['miou'], fbeta=v['fbeta'], fdr=v['fdr'])

    # 5. per epoch: train, checkpoint, validate (the checkpoint comes first: a failing val split loses no training)
    if not args.test_only:
        if state['val_pending']:   # resumed after an epoch whose validation did not finish
            validate_and_select()
        for epoch in range(state['epoch'], args.epochs):
            sampler.set_epoch(epoch)
            train_one_epoch(epoch, net, model, loader, opt, scaler, bank, state, args, env, steps=steps,
                            total=steps * args.epochs, record=record)
            state.update(epoch=epoch + 1, val_pending=(epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs)
            save('last.pt')
            if state['val_pending']:
                validate_and_select()
    # 6. test: the best-on-val checkpoint, on the test split (never used for selection), shared out over the ranks
    if env.ddp:
        dist.barrier()   # best.pt is written by rank 0
    try:
        metrics = test(model, test_set, args, env, run_dir, state, record)
    except Exception as e:   # the checkpoints stay: one line with the cause and the command that redoes the test
        record(kind='test_failed', error=str(e))
        raise TestFailed(test_failure(e, args, run_dir)) from e
    if log:
        log.close()
    if env.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


class TestFailed(ValueError):
    """The test after training (or --test-only) failed; its message is one line (test_failure)."""


def test_failure(e, args, run_dir):
    """One line for a failed test: the cause (for evaluate.SampleError the sample and its file), that the run's
    checkpoints are kept, and the README's commands that redo the test once the cause is fixed."""
    ckpt = args.resume if args.test_only else os.path.join(run_dir, 'best.pt')
    cause = (str(e).splitlines() or [''])[0]
    cause = cause if isinstance(e, (OSError, ValueError)) else f'{type(e).__name__}: {cause}'
    kept = '' if args.test_only else f'; checkpoints kept in {run_dir}'
    return (f'test failed: {cause}{kept}; redo the test with: python train.py --resume {ckpt} --test-only '
            f'(or: python evaluate.py --ckpt {ckpt}; add --no-probes to skip the audio probes)')


def restore(ckpt, model, opt, scaler, bank, state):
    model.load_state_dict(ckpt['model'])
    opt.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    state.update({k: ckpt.get(k, v) for k, v in state.items()})
    for c, clips in enumerate(ckpt['bank']):
        bank.clips[c].extend(clips)
    set_rng_state(ckpt['rng'])


def test(model, test_set, args, env, run_dir, state, record):
    """Every rank evaluates its share of the test split (evaluate.evaluate sums the counts over the ranks); rank 0
    writes metrics.json and prints the table."""
    path = args.resume if args.test_only else os.path.join(run_dir, 'best.pt')
    model.load_state_dict(evaluate.read_checkpoint(path, flag='--resume' if args.test_only else 'best.pt')['model'])
    metrics = evaluate.evaluate(model, test_set, env.device, amp_dtype=env.amp_dtype, probes=not args.no_probes,
                                vis=args.vis, vis_dir=os.path.join(run_dir, 'vis'), progress=env.master,
                                rank=env.rank, world=env.world, protocol=args.protocol, test_batch=args.test_batch)
    metrics.update(best_epoch=state['best_epoch'], val_miou=state['best'], checkpoint=path, args=vars(args))
    if not env.master:
        return metrics
    evaluate.write_json(os.path.join(run_dir, 'metrics.json'), metrics)
    env.say(evaluate.report(metrics, test_set.classes))
    env.say(f'results -> {os.path.join(run_dir, "metrics.json")}')
    record(kind='test', **{k: metrics[k] for k in ('miou', 'fbeta', 'fdr', 'cf_miou', 'halluc_silence',
                                                   'halluc_noise')})
    return metrics


# ------------------------------------------------------------------------------------- --benchmark

def benchmark(net, model, sampler, loader, opt, scaler, bank, args, env):
    """BENCH_WARMUP untimed steps, then N timed steps of the chosen --contrast alternating step by step with N of
    --contrast none (drift on a shared machine hits both alike). Each step is timed whole: loading, forward,
    loss, backward, optimizer. Prints images/s, ms/step and the ratio of the two; returns None."""
    def batches():
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            yield from loader
    modes = [args.contrast] + (['none'] if args.contrast != 'none' else [])
    times, stream = {m: [] for m in modes}, batches()
    sync = (lambda: torch.cuda.synchronize(env.device)) if env.cuda else (lambda: None)   # noqa: E731
    model.train()
    for i in range(BENCH_WARMUP + args.benchmark * len(modes)):
        mode = args.contrast if i < BENCH_WARMUP else modes[i % len(modes)]
        if i == BENCH_WARMUP and env.cuda:
            torch.cuda.reset_peak_memory_stats(env.device)
        sync()
        t0 = time.perf_counter()
        batch = next(stream)
        loss, _, _ = train_step(net, batch, args, env, contrast=mode, bank=bank, dataset=loader.dataset, step=i)
        optimize(loss, opt, scaler, model, args)
        sync()
        if i >= BENCH_WARMUP:
            times[mode].append(time.perf_counter() - t0)
    batch_size = loader.batch_size * env.world
    for m in modes:
        ms = 1000 * float(np.median(times[m]))
        env.say(f'benchmark --contrast {m}: {len(times[m])} steps of {batch_size} images on {env.device}: '
                f'{1000 * batch_size / ms:.1f} images/s, {ms:.0f} ms/step (median)')
    if len(modes) == 2:
        ratio = np.median(times[modes[0]]) / np.median(times['none'])
        env.say(f'step time ratio --contrast {modes[0]} / none: {ratio:.2f}x')
    if env.cuda:
        env.say(f'peak GPU memory {torch.cuda.max_memory_allocated(env.device) / 2**30:.2f} GiB')
    return None


if __name__ == '__main__':
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line naming the file or flag, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
