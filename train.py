"""Train CAVP (Sec. 4) on VPO (Sec. 3): cross-entropy + the CAVP contrastive term (Eq. 5).

    python train.py --data vpo_ss                          # built-in source, CPU preset, 8-10 min on 2 cores
    torchrun --nproc_per_node 8 train.py --data vpo_msmi --root /data/vpo --weights imagenet
    python train.py --data vpo_ss --resume runs/vpo_ss/last.pt
    python train.py --data vpo_ss --benchmark 20           # images/s and a per-phase time split

Device, precision and distribution are decided once at the top of main(); after that one code path
runs on a laptop CPU and on N GPUs alike.
"""
import argparse
import json
import os
import random
import sys
import time

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

# --benchmark: untimed steps first, so that the memory bank fills and cudnn has tuned the shapes it sees
BENCH_WARMUP = 10

# The paper's setting (App. B.1, NOTES-official-code.md) and the CPU preset used without a GPU: the same
# recipe scaled down for 2 CPU cores. Random init, ResNet-10 (ResNet-18 with one block per stage) for both the
# image branch at OS 16 and the audio branch, D = 76, AdamW at a higher lr, and everything at about half
# resolution: training crops of 64 px at scale 0.35-0.7 (a crop holds much of a 128-224 px built-in image)
# and val/test images resized by 0.5 (metrics at full resolution), 0.4 s audio windows, 7 epochs validated
# after epochs 4 and 7, and a 100-step linear lr warm-up to 8e-3 (not in the paper: from random init the model
# otherwise sat 1-2 epochs predicting all background). A ResNet-10 step at crop 64 is ~1.8x cheaper than a
# ResNet-18 one at crop 80, and 7 such epochs learn more than 4 of those (README, "what was tried"). It fits in
# 10 minutes (7 min 30 s in session 5, 9 min 46 s on session 4's slower day; 0.4 s audio bought the 7th epoch
# then: with 0.5 s it took 10 min 30 s) and is not converged.
PRESETS = {
    'paper': dict(backbone='resnet50', output_stride=8, crop=512, scale=(0.5, 2.0), batch_size=16, epochs=80, lr=1e-3, weight_decay=5e-4,
                  head_lr_mult=10.0, audio_seconds=3.0, balance=0.0, test_scale=1.0, max_anchors=512, eval_every=1, workers=8,
                  optimizer='sgd', dim=304, warmup_steps=0, audio_backbone='resnet18'),
    'cpu': dict(backbone='resnet10', audio_backbone='resnet10', output_stride=16, crop=64, scale=(0.35, 0.7), batch_size=16, epochs=7,
                optimizer='adamw', lr=8e-3, weight_decay=1e-4, head_lr_mult=1.0, audio_seconds=0.4, max_anchors=256,
                eval_every=4, workers=1, dim=76, balance=0.0, test_scale=0.5, warmup_steps=100),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument('--data', default='vpo_ss', choices=data.VPO_SUBSETS + data.AVSBENCH, help='benchmark: VPO subset (Sec. 3) or AVSBench s4 / ms3 / avss (Tables 1-3)')
    p.add_argument('--root', default=None, help='VPO folder from vpo.py, the official release, the built-in cache (default data/), or an AVSBench release')
    p.add_argument('--resize', type=int, default=None, help='AVSBench: resize frames to N x N (Tables 1-2 use 224); default original resolution (Table 3)')
    p.add_argument('--preset', default='auto', choices=['auto', 'paper', 'cpu'],
                   help="defaults for the flags left unset: 'paper' = App. B.1; 'cpu' = small demo; auto = cpu without CUDA")
    p.add_argument('--crop', type=int, default=None, help='train crop size (paper 512)')
    p.add_argument('--scale', type=float, nargs=2, default=None, metavar=('MIN', 'MAX'), help='random scale range of training images (paper 0.5 2.0)')
    p.add_argument('--test-scale', type=float, default=None, help='VPO: val/test images resized by this factor, metrics at original resolution (paper 1)')
    p.add_argument('--audio-seconds', type=float, default=None, help='audio window in seconds (App. B.1: VPO 3, AVSBench 1; CPU preset 0.4)')
    p.add_argument('--mono', action='store_true', help='mono audio, one log-mel plane (Fig. 7 / Table 8 ablation)')
    p.add_argument('--workers', type=int, default=None, help='data loader processes per GPU/process')
    p.add_argument('--balance', type=float, default=None, metavar='POWER',
                   help='class-balanced sampling: draw a sample with weight n_c^-POWER of its rarest sounding class (paper 0 = uniform)')
    # model
    p.add_argument('--backbone', default=None, choices=IMAGE_BACKBONES, help='image backbone (paper resnet50; resnet10 = ResNet-18 with one block per stage)')
    p.add_argument('--output-stride', type=int, default=None, choices=[8, 16], help='backbone output stride (paper 8)')
    p.add_argument('--dim', type=int, default=None, help='fused feature width D (official 304 = 256 ASPP + 48 low-level)')
    p.add_argument('--attn', default='sigmoid', choices=['sigmoid', 'softmax', 'minmax', 'channel', 'tpavi'], help='f_CA activation / variant (Sec. 4.1, Fig. 6, Table 5)')
    p.add_argument('--heads', type=int, default=4, help='attention heads of f_CA')
    p.add_argument('--weights', default='auto', help="image backbone init: 'imagenet' (local torch hub cache), a checkpoint path, 'none'; auto = imagenet on real data, none on the built-in source")
    p.add_argument('--audio-backbone', default=None, choices=AUDIO_BACKBONES, help='audio branch: resnet18 (VPO), vggish (AVSBench), resnet10 (lighter); default by --data')
    p.add_argument('--audio-weights', default=None, help='audio backbone checkpoint path (default random init; torchvggish file for vggish)')
    p.add_argument('--freeze-audio', action='store_true', help='do not train the audio backbone (AVSBench freezes VGGish)')
    # loss (Sec. 4.2)
    p.add_argument('--contrast', default='cavp', choices=['none', 'supcon', 'cavp'], help='contrastive term (Table 5)')
    p.add_argument('--cavp-weight', type=float, default=1.0, help='lambda of Eq. 5')
    p.add_argument('--tau', type=float, default=0.1, help='temperature of Eq. 4')
    p.add_argument('--max-anchors', type=int, default=None, help='sampled pixels per role (official 512)')
    p.add_argument('--pos-frac', type=float, default=0.5, help='share of positives vs negatives (Table 6)')
    p.add_argument('--bank-rate', type=float, default=0.5, help='probability that a mismatched pair gets a bank clip of the image class (App. B.1)')
    p.add_argument('--bank-size', type=int, default=8, help='memory bank clips per class')
    # optimisation (App. B.1)
    p.add_argument('--epochs', type=int, default=None, help='epochs (paper 80)')
    p.add_argument('--batch-size', type=int, default=None, help='global batch size (paper 16), split over processes')
    p.add_argument('--optimizer', default=None, choices=['sgd', 'adamw'], help='optimizer (paper SGD)')
    p.add_argument('--lr', type=float, default=None, help='base learning rate (paper 1e-3), not scaled by the GPU count')
    p.add_argument('--head-lr-mult', type=float, default=None, help='lr multiplier of everything but the image backbone (official 10)')
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    p.add_argument('--weight-decay', type=float, default=None, help='weight decay (paper 5e-4)')
    p.add_argument('--poly-power', type=float, default=0.9, help='poly decay (1 - it/total)^power')
    p.add_argument('--grad-clip', type=float, default=0.0, help='clip grad norm (0 = off)')
    p.add_argument('--warmup-steps', type=int, default=None, help='linear lr warm-up over the first N steps (paper 0)')
    # run
    p.add_argument('--name', default=None, help='run folder name under --out (default: --data)')
    p.add_argument('--out', default='runs', help='where run folders go')
    p.add_argument('--seed', type=int, default=0, help='seed of data, init, pairing')
    p.add_argument('--resume', default=None, help='checkpoint to continue from (last.pt)')
    p.add_argument('--eval-every', type=int, default=None, help='validate every N epochs (and at the last)')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (CUDA)')
    p.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'fp32'], help='autocast dtype on CUDA (auto: bf16 if supported, else fp16 + GradScaler); CPU runs fp32')
    p.add_argument('--channels-last', default='auto', choices=['auto', 'on', 'off'], help='channels_last memory format (auto: on with CUDA)')
    p.add_argument('--benchmark', type=int, default=0, help=f'time N steps after {BENCH_WARMUP} warm-up steps, print images/s and a phase split, and exit')
    p.add_argument('--vis', type=int, default=8, help='test pictures to write to runs/<name>/vis')
    p.add_argument('--no-probes', action='store_true', help='skip the audio probes on test')
    p.add_argument('--test-only', action='store_true', help='evaluate --resume on test and exit')
    p.add_argument('--max-steps', type=int, default=0, help='stop each epoch after N steps (smoke tests)')
    p.add_argument('--limit', type=int, default=0, help='use only the first N samples of each split (smoke tests)')
    args = p.parse_args(argv)
    preset = args.preset if args.preset != 'auto' else ('paper' if torch.cuda.is_available() else 'cpu')
    args.preset = preset
    if args.data in data.AVSBENCH:   # AVSBench: mono 1 s VGGish examples (App. B.1, following [63])
        args.audio_backbone = args.audio_backbone or 'vggish'
        args.mono, args.audio_seconds = True, 0.975
        args.test_scale = args.test_scale or 1.0   # frames are evaluated at --resize or original size
    for k, v in PRESETS[preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# -----------------------------------------------------------------------------------------------


class Step(torch.nn.Module):
    """One training forward (Eq. 1, Eq. 5) as a module, so DDP sees a single forward. The image branch
    runs once; its u_v is fused with the original audio and, for the contrastive term, with the
    permuted one."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, a, perm=None, rows=None, a_bank=None, tick=lambda name: None):
        m, B = self.model, x.shape[0]
        u_v = m.forward_image(x)['u_v']                                  # 1. image branch -> B, D, H/4, W/4
        # 2. audio branch -> B, D. The memory-bank clips of the permuted pairing (App. B.1) are new audio: they ride
        #    in the same pass as the batch's own clips, B + k in one batch (in train mode the audio BatchNorm's batch
        #    statistics then include them, like any other training clip). One pass instead of two: a CAVP step cost
        #    1.26x a CE step with a separate bank pass, 1.14x with one (fwd + bwd at the CPU preset, 7 bank clips).
        u_all = m.forward_audio(torch.cat([a, a_bank]) if rows else a)  #    a_bank may repeat rows (see the loop)
        u_a = u_all[:B]
        z, _ = m.fuse(u_v, u_a)                                          # 3. f_CA with its own audio -> B, D, h, w
        logits = m.classify(z, tuple(x.shape[-2:]))                      # 4. classifier -> B, C, H, W
        tick('forward')
        z_perm = None
        if perm is not None:   # 5. Eq. 1: the permuted pairing reuses u_v and u_a (no second image or audio pass)
            u_a_perm = u_a[perm]                                         #    B, D
            if rows:           #    ... with the bank clips' tokens in the swapped rows
                u_a_perm = u_a_perm.index_put((torch.tensor(rows, device=u_a.device),), u_all[B:B + len(rows)])
            z_perm, _ = m.fuse(u_v, u_a_perm)                            #    B, D, h, w
        tick('cavp_fuse')
        return logits, z, z_perm


def poly_lr(args, step, total):
    warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0   # not in the paper (default 0)
    return warm * args.lr * (1 - min(step, total - 1) / total) ** args.poly_power   # App. B.1


def save_atomic(obj, path):
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)   # a crash mid-write leaves the previous checkpoint intact


def rng_state():
    return {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s['python'])
    np.random.set_state(s['numpy'])
    torch.set_rng_state(s['torch'])
    if s['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s['cuda'])


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that yields (epoch, index): each sample's augmentation is a pure function
    of (seed, epoch, index), whatever the worker count, and again after a resume. With `weights` an
    epoch is len(dataset) draws with replacement (torch.multinomial seeded by seed + epoch, the same
    on every rank, then dealt out by rank) instead of a permutation."""

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
    """Per-sample draw weights that even out the sounding classes: a class seen in n_c training samples
    gets n_c ** -power (0 = uniform, the paper; 1 = every class equally often), and a sample takes the
    largest weight among its sounding classes (repeat-factor sampling, as LVIS does for rare classes).
    None when power is 0 or the dataset has no VPO rows (AVSBench: uniform).
    Not in the paper: on the built-in source some classes sound in 4x fewer samples than others (the
    persons share one slot per image, small shapes fail VPO's area rule more often), and the per-class
    mIoU then reads 0 for them after a short CPU run."""
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


@torch.no_grad()
def validate(model, dataset, device, amp_dtype, rank, world):
    """Dataset-level mIoU on this rank's share of the split; confusion matrices summed over ranks."""
    model.eval()
    conf = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64, device=device)
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    for i in range(rank, len(dataset), world):
        s = dataset[i]
        label = s['label'][None].to(device)
        logits, _ = evaluate.runner(model, s['image'][None].to(device), amp, label.shape[-2:])(s['audio'][None].to(device))
        conf += evaluate.confusion_matrix(logits.argmax(1), label, dataset.num_classes)
    if world > 1:
        dist.all_reduce(conf)
    model.train()
    return evaluate.semantic_scores(conf.cpu())


def main(argv=None):
    args = get_args(argv)
    # ---- device, precision, distribution: decided here, once ----
    ddp = 'RANK' in os.environ
    if ddp:
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', 0))
    else:
        rank, world, local = 0, 1, 0
    cuda = torch.cuda.is_available()
    device = torch.device(f'cuda:{local}' if cuda else 'cpu')
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = None
    if cuda and args.amp != 'fp32':
        amp_dtype = torch.float16 if args.amp == 'fp16' or (args.amp == 'auto' and not torch.cuda.is_bf16_supported()) else torch.bfloat16
    channels_last = args.channels_last == 'on' or (args.channels_last == 'auto' and cuda)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    run_dir = os.path.join(args.out, args.name or args.data)
    if master:
        os.makedirs(run_dir, exist_ok=True)
    start_epoch, step, best, best_epoch, ckpt = 0, 0, -1.0, -1, None
    if args.resume:
        if not os.path.exists(args.resume):
            raise FileNotFoundError(f'--resume {args.resume}: no such checkpoint')
        ckpt = torch.load(args.resume, map_location='cpu', weights_only=False)
        saved = ckpt['args']
        for k in ('data', 'backbone', 'output_stride', 'dim', 'attn', 'heads', 'mono', 'audio_seconds', 'audio_backbone', 'resize'):
            if saved.get(k) != getattr(args, k):
                say(f'note: --resume uses the checkpoint\'s {k}={saved.get(k)!r} (command line said {getattr(args, k)!r})')
                setattr(args, k, saved.get(k))

    # ---- data ----
    source = 'avsbench'
    if args.data not in data.AVSBENCH:   # rank 0 generates the built-in source once; the others wait, then look
        if master:
            source = data.resolve_root(args.data, args.root, seed=args.seed)[1]
        if ddp:
            dist.barrier()
        if not master:
            source = data.resolve_root(args.data, args.root, seed=args.seed, progress=False)[1]
    if args.weights == 'auto':   # ImageNet features do not transfer to the generated shapes; say so, do not pretend
        # (torchvision has no ImageNet resnet10, the CPU preset's trunk: random init there too, printed in the args line)
        args.weights = 'none' if source == 'builtin' or args.backbone in NO_IMAGENET else 'imagenet'
    mk = lambda split, train: data.build_dataset(args.data, args.root, split, train=train, crop=args.crop, scale=args.scale,
                                                 audio_seconds=args.audio_seconds, mono=args.mono, seed=args.seed, resize=args.resize,
                                                 test_scale=args.test_scale)
    train_set, val_set, test_set = mk('train', True), mk('val', False), mk('test', False)
    if args.limit:
        for ds in (train_set, val_set, test_set):
            ds.rows = ds.rows[:args.limit]
    per_rank = args.batch_size // world
    if per_rank < 2 or per_rank * world != args.batch_size:
        raise ValueError(f'--batch-size {args.batch_size} must split into >= 2 per process over {world} processes')
    sampler = EpochSampler(train_set, weights=balance_weights(train_set, args.balance), num_replicas=world, rank=rank,
                           shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=args.workers,
                                         pin_memory=cuda, drop_last=True, persistent_workers=args.workers > 0,
                                         prefetch_factor=4 if args.workers > 0 else None)
    steps_per_epoch = len(loader) if not args.max_steps else min(args.max_steps, len(loader))
    if steps_per_epoch == 0:
        raise ValueError(f'{args.data} train has {len(train_set)} samples: fewer than one batch of {per_rank}')
    total = steps_per_epoch * args.epochs

    # ---- model, optimizer ----
    model = CAVP(num_classes=train_set.num_classes, backbone=args.backbone, output_stride=args.output_stride,
                 audio_channels=1 if args.mono else 2, attn=args.attn, heads=args.heads, dim=args.dim,
                 audio_backbone=args.audio_backbone, freeze_audio=args.freeze_audio,
                 weights=None if args.weights == 'none' else args.weights, audio_weights=args.audio_weights)
    args.num_classes = train_set.num_classes
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    backbone_params = [q for q in model.backbone.parameters() if q.requires_grad]
    ids = {id(q) for q in backbone_params}
    other = [q for q in model.parameters() if id(q) not in ids and q.requires_grad]   # --freeze-audio leaves some out
    groups = [{'params': backbone_params, 'mult': 1.0}, {'params': other, 'mult': args.head_lr_mult}]
    if args.optimizer == 'sgd':
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, fused=True)
    else:
        # fused: one kernel over all parameters (CPU and CUDA); the per-tensor loop cost ~80 ms a step on 2 CPU cores
        opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scaler = torch.amp.GradScaler('cuda', enabled=amp_dtype == torch.float16)
    bank = L.MemoryBank(num_classes=train_set.num_classes, capacity=args.bank_size)
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        opt.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        start_epoch, step, best, best_epoch = ckpt['epoch'], ckpt['step'], ckpt['best'], ckpt['best_epoch']
        for c, clips in enumerate(ckpt['bank']):
            bank.clips[c].extend(clips)
        set_rng_state(ckpt['rng'])
    step_module = Step(model)
    if ddp:
        if cuda:
            step_module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
        step_module = torch.nn.parallel.DistributedDataParallel(step_module, device_ids=[local] if cuda else None)
    if args.compile:
        step_module = torch.compile(step_module)
    n_params = sum(q.numel() for q in model.parameters())
    say(f'cavp | {args.data} | preset {args.preset} | {device} x{world} | amp {amp_dtype} | channels_last {channels_last} | '
        f'{n_params / 1e6:.1f} M params | train/val/test {len(train_set)}/{len(val_set)}/{len(test_set)} | '
        f'{steps_per_epoch} steps x {args.epochs} epochs')
    say('args: ' + json.dumps({k: v for k, v in vars(args).items()}, sort_keys=True))

    def checkpoint(epoch, path):
        save_atomic({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'scaler': scaler.state_dict(),
                     'epoch': epoch, 'step': step, 'best': best, 'best_epoch': best_epoch, 'args': vars(args),
                     'rng': rng_state(), 'bank': [list(c) for c in bank.clips]}, path)

    log = open(os.path.join(run_dir, 'log.jsonl'), 'a') if master else None

    def record(**kv):
        if log:
            log.write(json.dumps(kv) + '\n')
            log.flush()

    # ---- the loop ----
    times, bench = {}, [0, 0.0]   # phase seconds; [steps so far, start time] of --benchmark
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    clock = [time.perf_counter()]

    def tick(name):
        if args.benchmark:
            sync()
            now = time.perf_counter()
            times[name] = times.get(name, 0.0) + now - clock[0]
            clock[0] = now

    if not args.test_only:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            model.train()
            bar = tqdm(loader, total=steps_per_epoch, desc=f'epoch {epoch + 1}/{args.epochs}', disable=not master or args.benchmark > 0,
                       dynamic_ncols=True, file=sys.stdout)
            t_epoch, seen = time.perf_counter(), 0
            clock[0] = time.perf_counter()
            for it, batch in enumerate(bar):
                if it >= steps_per_epoch:
                    break
                if args.benchmark and bench[0] == BENCH_WARMUP:   # warm-up done
                    times.clear()
                    bench[1] = time.perf_counter()
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                if args.benchmark and bench[0] == BENCH_WARMUP + args.benchmark:
                    report_benchmark(args, times, time.perf_counter() - bench[1], per_rank * world, device, say)
                    return None
                bench[0] += 1
                x = batch['image'].to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                a, y, t = batch['audio'].to(device), batch['label'].to(device), batch['t'].to(device)
                tick('data')
                lr = poly_lr(args, step, total)
                for g in opt.param_groups:
                    g['lr'] = lr * g['mult']
                seed = args.seed * 1_000_003 + step * world + rank   # pairing, bank and sampling: a function of the step
                gen, gen_dev = torch.Generator().manual_seed(seed), torch.Generator(device).manual_seed(seed)
                perm = rows = a_bank = a_hot = None
                if args.contrast == 'cavp':   # Eq. 1: random audio-visual pairing inside the batch
                    perm = L.pair_permutation(per_rank, generator=gen)
                    a_hot = t[perm.to(device)].bool()
                    swap = L.bank_swap(perm, batch['t'], batch['bank_cls'], rate=args.bank_rate, stored=bank.stored(), generator=gen)
                    if swap.any():   # App. B.1: the bank clip really replaces the audio (NOTES bug 3)
                        rows = swap.nonzero()[:, 0].tolist()
                        waves = []
                        for i in rows:
                            clip = bank.sample(int(batch['bank_cls'][i]), generator=gen).numpy()
                            waves.append(clip[None] if args.mono else vpo.pan(clip, float(batch['bank_alpha'][i]), sr=data.SR, itd=train_set.itd))
                        a_bank = train_set.audio_transform(torch.from_numpy(np.stack(waves)).float().to(device))
                        if torch.backends.cudnn.benchmark:   # cudnn re-tunes every conv (forward and backward) for each new
                            # batch size, and the audio pass sees B + 1..B clips (1..B bank clips in a pass of their own
                            # made a CAVP step 9x a CE step on a GPU). Cycle the clips up to a power of two (at most
                            # log2(B) + 1 shapes); Step keeps the first len(rows) outputs. The repeats only re-weigh
                            # some clips in the audio BatchNorm's statistics of that pass.
                            a_bank = a_bank[torch.arange(1 << (len(rows) - 1).bit_length()) % len(rows)]
                        a_hot = torch.where(swap.to(device)[:, None], F.one_hot(batch['bank_cls'].to(device), t.shape[1]).bool(), a_hot)
                    bank.push(batch['bank_wave'], batch['bank_cls'])
                tick('cavp_pair')
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits, z, z_perm = step_module(x, a, None if perm is None else perm.to(device), rows, a_bank, tick)
                    ce = F.cross_entropy(logits.float(), y, ignore_index=255)          # Eq. 5, original pairs only
                    cl = torch.zeros((), device=device)
                    if args.contrast == 'cavp':
                        cl, stats = L.contrastive_loss(torch.cat([z, z_perm]).float(), torch.cat([y, y]), torch.cat([t, a_hot.float()]),
                                                       torch.cat([t, t]), mode='cavp', tau=args.tau, max_anchors=args.max_anchors,
                                                       pos_frac=args.pos_frac, generator=gen_dev)
                    elif args.contrast == 'supcon':
                        cl, stats = L.contrastive_loss(z.float(), y, t, t, mode='supcon', tau=args.tau, max_anchors=args.max_anchors,
                                                       pos_frac=args.pos_frac, generator=gen_dev)
                    total_loss = ce + args.cavp_weight * cl                               # Eq. 5
                tick('cavp_loss')
                if not torch.isfinite(total_loss):
                    raise FloatingPointError(f'non-finite loss at step {step} (epoch {epoch + 1}): ce={ce.item()} '
                                             f'contrast={cl.item()}; batch samples {batch["index"].tolist()}')
                opt.zero_grad(set_to_none=True)
                scaler.scale(total_loss).backward()
                tick('backward')
                if args.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                scaler.step(opt)
                scaler.update()
                tick('optimizer')
                step += 1
                seen += x.shape[0] * world
                if master and (it % 10 == 0 or it == steps_per_epoch - 1):
                    ips = seen / (time.perf_counter() - t_epoch)
                    bar.set_postfix(ce=f'{ce.item():.3f}', cl=f'{cl.item():.3f}', lr=f'{lr:.2e}', ips=f'{ips:.1f}')
                    record(kind='step', epoch=epoch + 1, step=step, ce=ce.item(), contrast=cl.item(), lr=lr, images_per_s=ips)
            bar.close()
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                v = validate(model, val_set, device, amp_dtype, rank, world)
                if v['miou'] > best:
                    best, best_epoch = v['miou'], epoch + 1
                    if master:
                        checkpoint(epoch + 1, os.path.join(run_dir, 'best.pt'))
                say(f'epoch {epoch + 1}: val mIoU {v["miou"]:.4f} F {v["fbeta"]:.4f} FDR {v["fdr"]:.4f} (best {best:.4f} @ {best_epoch})')
                record(kind='val', epoch=epoch + 1, miou=v['miou'], fbeta=v['fbeta'], fdr=v['fdr'])
            if master:
                checkpoint(epoch + 1, os.path.join(run_dir, 'last.pt'))
        if args.benchmark:
            say('--benchmark: fewer steps than asked were available')
            return None

    # ---- test: the best-on-val checkpoint, on the test split (never used for selection) ----
    metrics = None
    if master:
        path = args.resume if args.test_only else os.path.join(run_dir, 'best.pt')
        model.load_state_dict(torch.load(path, map_location='cpu', weights_only=False)['model'])
        metrics = evaluate.evaluate(model, test_set, device, amp_dtype=amp_dtype, probes=not args.no_probes,
                                    vis=args.vis, vis_dir=os.path.join(run_dir, 'vis'), progress=True)
        metrics.update(best_epoch=best_epoch, val_miou=best, checkpoint=path, args=vars(args))
        with open(os.path.join(run_dir, 'metrics.json'), 'w') as f:
            json.dump(metrics, f, indent=1)
        say(evaluate.format_table(metrics, test_set.classes))
        say(f'results -> {os.path.join(run_dir, "metrics.json")}')
        record(kind='test', **{k: metrics[k] for k in ('miou', 'fbeta', 'fdr', 'cf_miou', 'halluc_silence', 'halluc_noise')})
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def report_benchmark(args, times, seconds, batch, device, say):
    steps = args.benchmark
    say(f'benchmark: {steps} steps of {batch} images on {device}: {steps * batch / seconds:.1f} images/s, '
        f'{1000 * seconds / steps:.0f} ms/step')
    cavp = sum(times.get(k, 0) for k in ('cavp_pair', 'cavp_fuse', 'cavp_loss'))
    for k in ('data', 'forward', 'cavp_pair', 'cavp_fuse', 'cavp_loss', 'backward', 'optimizer'):
        say(f'  {k:10s} {1000 * times.get(k, 0) / steps:8.1f} ms/step')
    say(f'  (CAVP total {1000 * cavp / steps:.1f} ms/step; forward includes the bank clips\' audio, cavp_loss includes CE and sampling)')
    if device.type == 'cuda':
        say(f'  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB')


if __name__ == '__main__':
    main()
