"""Evaluation: the paper's dataset-level metrics, AVSBench-style per-image J and F, audio probes that
turn the paper's qualitative figures into numbers, pictures (Sec. 5.1, Tables 3-4, 8-11, Figs. 1, 7,
10-14, App. C), a table of runs over seeds, and predictions for your own image and sound or your own video.
On AVSBench, --protocol avsbench adds AVSBench's own test numbers of the same predictions (Table 1;
AVSBenchScores).

    python evaluate.py --ckpt runs/<name>/best.pt [--data vpo_ss] [--root DIR] [--vis 8]
    python evaluate.py --ckpt runs/s4/best.pt --mono --protocol avsbench [--test-batch 4]   # + AVSBench's own
    python evaluate.py --summary runs/a_s0 runs/a_s1 runs/b_s0 ...      # mean +- std per setting
    python evaluate.py --ckpt runs/<name>/best.pt --image photo.jpg --audio dog.wav car.flac [--alpha 0.2]
    python evaluate.py --ckpt runs/<name>/best.pt --video clip.mp4 [--fps 1] [--start 60] [--duration 30]

Evaluation streams over the test split one image at a time (batch 1, App. B.1; the image at the dataset's
test_scale, 1 = original resolution, the labels and so the metrics always at original resolution): only a
confusion matrix and running sums are kept, so memory does not grow with the dataset.
train.py validates with confusion_matrix / semantic_scores, tests with evaluate() and prints report().
"""
import argparse
import fcntl
import itertools
import json
import math
import os
import pickle
import re
import shutil
import statistics
import sys
import tempfile
from fractions import Fraction

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

import data
import vpo

# -----------------------------------------------------------------------------------------------
# metrics: pure functions over a bincount confusion matrix (Sec. 5.1)


def confusion_matrix(pred, target, num_classes, ignore_index=255):
    """(C, C) int64 counts, rows = target class, columns = predicted class, on the inputs' device (so
    train.py can all_reduce it); pixels whose target is ignore_index are skipped. pred, target: integer
    tensors of one shape (e.g. B, H, W)."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes or p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f'confusion_matrix: labels outside 0..{num_classes - 1} (and not ignore_index={ignore_index})')
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _div(a, b):
    """a / b elementwise with 0 where b == 0 (the 0/0 cases documented in semantic_scores)."""
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


def semantic_scores(conf, beta2=0.3):
    """The paper's dataset-level metrics (Sec. 5.1, Tables 3-4, 8-11) from a confusion matrix summed over
    the whole split (sum of intersections / sum of unions, not a mean over images), per class c:
        IoU_c = TP / (TP + FP + FN)
        P_c = TP / (TP + FP),  R_c = TP / (TP + FN),  F_beta,c = (1 + beta2) P R / (beta2 P + R), beta2 = 0.3
        FDR_c = FP / (TP + FP)
    `miou`, `fbeta`, `fdr` are means over classes INCLUDING background, each over the classes where it is
    defined, as the paper's tables average them (official `utils/eval_utils.py`: nanmean):
        IoU and F_beta are undefined only for a class absent from both target and prediction (TP + FP + FN = 0);
        a class present but never predicted scores 0 in both (Table 9's axe, clipper, ... count as 0);
        FDR is undefined where nothing was predicted (TP + FP = 0), so such a class leaves FDR's mean: Table 11's
        CAVP row averages to Table 3's 32.25 only without axe and harmonica (31.34 with them as 0).
    Other 0/0 cases: predicted but never present gives IoU 0, P 0, R 0, F 0, FDR 1; present but never predicted
    gives P 0 (0/0) and R 0. (Official mIoU also counts classes absent from both as 0; on VPO and AVSBench's test
    splits every class is present, so the two agree there.)
    Returns {'miou', 'fbeta', 'fdr' (floats in [0, 1]), 'per_class': {'iou', 'precision', 'recall',
    'fbeta', 'fdr': lists of length C, None where undefined}}. An all-zero matrix raises ValueError."""
    conf = conf.double()
    tp = conf.diag()
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    seen, predicted = (tp + fp + fn) > 0, (tp + fp) > 0
    if not seen.any():
        raise ValueError('semantic_scores: empty confusion matrix (every pixel ignored?)')
    p, r = _div(tp, tp + fp), _div(tp, tp + fn)
    per = {'iou': _div(tp, tp + fp + fn), 'precision': p, 'recall': r,
           'fbeta': _div((1 + beta2) * p * r, beta2 * p + r), 'fdr': _div(fp, tp + fp)}
    defined = {k: seen & predicted if k == 'fdr' else seen for k in per}
    out = {'per_class': {k: [v.item() if d else None for v, d in zip(x, defined[k])] for k, x in per.items()}}
    out.update({name: class_mean(out['per_class'][k]) for name, k in (('miou', 'iou'), ('fbeta', 'fbeta'),
                                                                      ('fdr', 'fdr'))})
    return out


def class_mean(values):
    """The mean over classes of a per-class list, None (undefined) entries left out (official: nanmean);
    None when no class is defined."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def mask_iou(pred, gt, valid=None):
    """AVSBench-style Jaccard index J of binary foreground, one value per image: (B, H, W) -> (B,).
    pred, gt: bool (or 0/1) foreground masks; valid: optional bool mask of pixels to score (ours: label
    != 255). An image whose ground truth has no foreground scores the fraction of its pixels predicted
    background (as AVSBench); an image with no valid pixel is NaN (callers skip it). Average the values
    over images: unlike a batch-level ratio, the mean does not depend on how images are batched."""
    pred, gt = pred.bool(), gt.bool()
    valid = torch.ones_like(gt) if valid is None else valid.bool()
    pred, gt = pred & valid, gt & valid
    inter = (pred & gt).flatten(1).sum(1).double()                     # B
    union = (pred | gt).flatten(1).sum(1).double()
    n = valid.flatten(1).sum(1).double()
    empty = gt.flatten(1).sum(1) == 0
    j = torch.where(empty, (n - pred.flatten(1).sum(1)) / n.clamp_min(1), inter / union.clamp_min(1))
    return torch.where(n > 0, j, torch.full_like(j, float('nan')))


def f_score(prob, gt, beta2=0.3, valid=None, num_thresholds=255):
    """AVSBench-style F-measure of binary foreground, one value per image: (B, H, W) -> (B,). For each
    image, foreground = prob >= t at 255 thresholds t = linspace(0, 1 - 1e-10); F_t = (1 + beta2) P R /
    (beta2 P + R) (0 where P = R = 0), and the image scores max_t F_t of its OWN curve (f_curve). AVSBench
    instead takes the max of the curve averaged over a test batch, so its F depends on the batch size
    (batch_scores, --protocol avsbench); the mean of these per-image values does not. Images with no
    foreground in gt are NaN (AVSBench skips them too), as are images with no valid pixel. prob: foreground
    probability in [0, 1]."""
    th = torch.linspace(0, 1 - 1e-10, num_thresholds, dtype=torch.float64, device=prob.device)
    f = f_curve(prob, gt, th, beta2=beta2, valid=valid).amax(1)                   # B
    n_gt = (gt.bool() if valid is None else gt.bool() & valid.bool()).flatten(1).sum(1)
    return torch.where(n_gt > 0, f, torch.full_like(f, float('nan')))


def f_curve(prob, gt, thresholds, beta2=0.3, valid=None):
    """F_beta of foreground = prob >= t at each of the sorted thresholds t, per image: (B, H, W) -> (B, K), float64;
    P = TP / #predicted, R = TP / #gt, each 0 where its denominator is 0, and F_t = 0 where P = R = 0. Only
    valid pixels count (default all)."""
    gt = gt.bool()
    valid = torch.ones_like(gt) if valid is None else valid.bool()
    B, K = prob.shape[0], len(thresholds)
    th = thresholds.to(prob.device, torch.float64)
    # bin k + 1 holds probs in [th[k], th[k+1]); "prob >= th[k]" counts bins k + 1 .. K (suffix sums)
    bins = torch.bucketize(prob.double().flatten(1), th, right=True)   # B, HW in 0..K
    offset = (torch.arange(B, device=prob.device) * (K + 1))[:, None]
    v, g = valid.flatten(1), gt.flatten(1) & valid.flatten(1)
    size = B * (K + 1)
    all_hist = torch.bincount((bins + offset)[v], minlength=size).view(B, -1)   # B, K + 1
    fg_hist = torch.bincount((bins + offset)[g], minlength=size).view(B, -1)
    n_pred = all_hist.flip(1).cumsum(1).flip(1)[:, 1:].double()       # B, K: #(prob >= th[k])
    tp = fg_hist.flip(1).cumsum(1).flip(1)[:, 1:].double()
    n_gt = g.sum(1, keepdim=True).double()
    p, r = _div(tp, n_pred), _div(tp, n_gt.expand_as(tp))
    return _div((1 + beta2) * p * r, beta2 * p + r)                    # B, K


def format_table(metrics, classes):
    """Markdown per-class table (like Tables 9-11, transposed: one row per class), values in %; after
    evaluate(), a line below it with the probes' counts (probe_counts)."""
    pc = metrics['per_class']
    cols = ('iou', 'fbeta', 'precision', 'recall', 'fdr')
    fmt = lambda x: '-' if x is None else f'{100 * x:.2f}'
    lines = ['| class | IoU | F_beta | precision | recall | FDR |', '|---|---:|---:|---:|---:|---:|']
    lines += [f'| {c} | ' + ' | '.join(fmt(pc[k][i]) for k in cols) + ' |' for i, c in enumerate(classes)]
    lines.append(f"| **mean** | {fmt(metrics['miou'])} | {fmt(metrics['fbeta'])} | | | {fmt(metrics['fdr'])} |")
    if 'cf_n' in metrics:
        lines += ['', probe_counts(metrics)]
    return '\n'.join(lines)


def probe_counts(m):
    """'probes: cf_n 6, skipped 3 (no clip); stereo_n 0, skipped 0': the samples each probe scored and those
    it skipped, by reason (Probes); 'probes: off' when none ran (--no-probes, AVSBench)."""
    if m.get('halluc_silence') is None:
        return 'probes: off'
    skips = lambda d: ', '.join(f'{v} ({k})' for k, v in d.items() if v) or '0'
    return '; '.join(f"{'probes: ' * (p == 'cf')}{p}_n {m[p + '_n']}, skipped {skips(m[p + '_skipped'])}"
                     for p in ('cf', 'stereo'))


def summary(m):
    """One line with the headline numbers (in %), None shown as '-'; with AVSBench's numbers (--protocol avsbench)
    each line names its protocol."""
    fmt = lambda k: '-' if m.get(k) is None else f'{100 * m[k]:.2f}'
    keys = ('miou', 'fbeta', 'fdr', 'J', 'F', 'cf_miou', 'halluc_silence', 'halluc_noise', 'stereo_acc',
            'stereo_swap_acc')
    line = f"n={m['n']} " + ' '.join(f'{k}={fmt(k)}' for k in keys)
    a = m.get('avsbench')
    return line if a is None else f"cavp: {line}\navsbench: J={100 * a['J']:.2f} F={100 * a['F']:.2f}"

# -----------------------------------------------------------------------------------------------
# probes: which audio replaces the original, and which instance a stereo swap should move to


def counterfactual_class(objects):
    """The class whose audio replaces the original in the counterfactual probe (Figs. 1, 14), or None
    when the image holds fewer than 2 VPO classes or none of them can be played: the first class (in
    object order) that is not sounding; if every class sounds (MS), the first class other than the first
    sounding object's. Only classes whose objects all have a clip are chosen: vpo.py writes `clip: null`
    for the objects of a class it found no audio for (summary.json: classes_without_audio)."""
    present = list(dict.fromkeys(o['cls'] for o in objects))
    if len(present) < 2:
        return None
    mute = {o['cls'] for o in objects if not o.get('clip')}
    sounding = {o['cls'] for o in objects if o['sounding']}
    silent = [c for c in present if c not in sounding and c not in mute]
    if silent:
        return silent[0]
    first = next((o['cls'] for o in objects if o['sounding']), None)
    return next((c for c in present if c != first and c not in mute), None)


def mirror_pair(objects):
    """(s, m) object indices for the stereo-swap probe (Fig. 13), or None: s = the first sounding object
    that is the only sounding instance of its class; m = a silent instance of the same class on the
    other side of the image (alpha - 0.5 of opposite sign), the one whose alpha is nearest 1 - alpha_s,
    i.e. where the source appears after swapping L and R."""
    for s, o in enumerate(objects):
        same = [k for k, q in enumerate(objects) if q['cls'] == o['cls']]
        if not o['sounding'] or sum(objects[k]['sounding'] for k in same) != 1:
            continue
        other_side = [k for k in same if (objects[k]['alpha'] - 0.5) * (o['alpha'] - 0.5) < 0]
        if other_side:
            return s, min(other_side, key=lambda k: abs(objects[k]['alpha'] - (1 - o['alpha'])))
    return None

# -----------------------------------------------------------------------------------------------
# evaluation over a split: metrics, probes and pictures, fed by one loop


def runner(model, x, amp, size=None):
    """run(audios) -> (logits float32 (k, C, *size), attn (k, heads, h, w)) for image x (1, 3, H, W) and a
    (k, A, T, F) stack of k audio inputs, all in one batch; size: the label's (H, W), default x's (they
    differ when the dataset rescales test images: logits are upsampled to the label, where metrics live).
    Models with the split API (model.CAVP) run the image branch once and fuse its u_v with every audio the
    probes need (Sec. 4.1: audio enters only at fusion); others (tests' fakes, peers) are called as
    model(x repeated k times, audios)."""
    size = tuple(size or x.shape[-2:])
    split = all(hasattr(model, n) for n in ('forward_image', 'forward_audio', 'fuse', 'classify'))
    with amp():
        v = model.forward_image(x) if split else None

    def run(audios):
        k = audios.shape[0]
        with amp():
            if split:
                u_v = v['u_v'].expand(k, -1, -1, -1)                                  # k, D, h, w
                z, attn = model.fuse(u_v, model.forward_audio(audios))                # z: k, D, h, w
                logits = model.classify(z, size)                                      # k, C, H, W
            else:
                out = model(x.expand(k, -1, -1, -1), audios)
                logits, attn = out['logits'], out['attn']
                if tuple(logits.shape[-2:]) != size:
                    logits = F.interpolate(logits, size=size, mode='bilinear', align_corners=False)
        return logits.float(), attn
    return run


class SplitMetrics:
    """Running sums over a split (Sec. 5.1): the confusion matrix, and per-image J and F of binary
    foreground (predicted fg = argmax != 0, fg = label in 1..C-1, label 255 pixels not scored)."""
    SUMS = ('conf', 'j_sum', 'j_n', 'f_sum', 'f_n')   # what sum_over_ranks adds up

    def __init__(self, num_classes):
        self.C = num_classes
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.j_sum, self.j_n, self.f_sum, self.f_n = 0.0, 0, 0.0, 0

    def add(self, logits, label):
        """logits (1, C, H, W) float, label (1, H, W) on the same device."""
        pred = logits.argmax(1)                                                       # 1, H, W
        self.conf += confusion_matrix(pred, label, self.C).cpu()
        valid, gt = label != 255, (label != 0) & (label != 255)
        j = mask_iou(pred != 0, gt, valid)
        f = f_score(1 - logits.softmax(1)[:, 0], gt, valid=valid)
        self.j_sum, self.j_n = self.j_sum + j.nansum().item(), self.j_n + (~j.isnan()).sum().item()
        self.f_sum, self.f_n = self.f_sum + f.nansum().item(), self.f_n + (~f.isnan()).sum().item()

    def per_image(self):
        return dict(J=self.j_sum / self.j_n if self.j_n else None, F=self.f_sum / self.f_n if self.f_n else None)


# -----------------------------------------------------------------------------------------------
# --protocol avsbench: AVSBench's own test numbers from the same predictions (the paper's Table 1)

PROTOCOLS = ('cavp', 'avsbench')
PROTOCOL_HELP = ("cavp: ours, the paper's Tables 2-4 (default); avsbench: also AVSBench's own test numbers "
                 "(its test.py, the paper's Table 1; --data s4, ms3, avss), under 'avsbench' in metrics.json")
AVSBENCH_TEST_BATCH = 4   # videos per test batch: --test_batch_size 4 in AVSBench's avs_s4 / avs_ms3 test.sh
TEST_BATCH_HELP = (f'--protocol avsbench, S4 / MS3: videos per test batch, which its F depends on '
                   f'(default {AVSBENCH_TEST_BATCH} = 20 frames, as AVSBench\'s test.sh)')
# AVSBench's `_eval_pr` thresholds: float32, so 1 - 1e-10 rounds to 1 and a probability of 1 still counts
AVSBENCH_THRESHOLDS = torch.linspace(0, 1 - 1e-10, 255, dtype=torch.float32)
AVSS_CLIP = 10   # AVSBench's avss loader pads every clip to 10 frames


def resolve_test_batch(protocol, test_batch, data_name):
    """The videos per test batch that `protocol` uses on --data data_name (None for cavp); bad combinations
    raise ValueError naming the flag."""
    if protocol not in PROTOCOLS:
        raise ValueError(f'--protocol {protocol}: expected one of {", ".join(PROTOCOLS)}')
    if protocol == 'cavp':
        if test_batch is not None:
            raise ValueError(f'--test-batch {test_batch}: only with --protocol avsbench (the cavp metrics do not '
                             'depend on batching)')
        return None
    if data_name not in data.AVSBENCH:
        raise ValueError(f'--protocol avsbench: AVSBench\'s test is for --data {", ".join(data.AVSBENCH)}, '
                         f'not {data_name}')
    if test_batch is not None and test_batch < 1:
        raise ValueError(f'--test-batch {test_batch}: expected >= 1 videos per test batch')
    return AVSBENCH_TEST_BATCH if test_batch is None else test_batch


def avsbench_frames(logits, label):
    """AVSBench's per-frame scores of binary (S4 / MS3) predictions, as `avs_scripts/avs_s4/utility.py` computes
    them from its one-logit model: logits (B, 2, H, W) float32, label (B, H, W), 1 = foreground. The logit is
    l_fg - l_bg, whose sigmoid is the softmax's foreground probability. Returns (J (B,), has_fg (B,) bool,
    curve (B, 255)):
      J       Jaccard of sigmoid > 0.5; an empty ground truth scores the share of pixels predicted background
              (its true-negative rule, `mask_iou`)
      curve   F_beta (beta^2 = 0.3) at its 255 thresholds (AVSBENCH_THRESHOLDS, f_curve)
    Every pixel is scored and a label other than 1 is background: the official masks have no ignore label."""
    prob = torch.sigmoid(logits[:, 1].float() - logits[:, 0].float())               # B, H, W
    gt = label == 1
    return mask_iou(prob > 0.5, gt), gt.flatten(1).any(1), f_curve(prob, gt, AVSBENCH_THRESHOLDS)


def video_batches(rows, n, videos):
    """[(start, stop)] row ranges of AVSBench's test batches over rows[:n]: `videos` consecutive videos each, in
    row order (the released CSV's, as its loader with shuffle=False); a video is a run of rows with the same
    (subset, category, video)."""
    key = lambda r: (r.get('subset'), r.get('category'), r.get('video'))
    starts = [i for i in range(n) if i == 0 or key(rows[i]) != key(rows[i - 1])]
    cuts = starts[::videos] + [n]
    return list(zip(cuts[:-1], cuts[1:]))


def batch_scores(j, has_fg, curves, batches):
    """AVSBench's S4 / MS3 test numbers (`avs_scripts/avs_s4/test.py`) from per-frame J (n,), has_fg (n,) and
    F-curves (n, K): per test batch, J_b = the mean J of its frames and F_b = the max over thresholds of the mean
    curve of its frames with foreground (0 when it has none: the official score starts at zeros); J and F are the
    means over the batches (J is then the mean over frames when every batch is full). Returns (J, F)."""
    js, fs = [], []
    for lo, hi in batches:
        keep = has_fg[lo:hi]
        js.append(j[lo:hi].mean().item())
        fs.append(curves[lo:hi][keep].mean(0).max().item() if keep.any() else 0.0)
    return sum(js) / len(js), sum(fs) / len(fs)


def avss_frame(logits, label, beta2=0.3):
    """AVSBench's per-class scores of one semantic frame (`avs_scripts/avss/utils/compute_color_metrics.py`):
    logits (1, C, H, W), label (1, H, W). The prediction is the argmax of the softmax (as there: classes tied after
    rounding go to the lower index). Per class c with P its predicted and G its labelled pixels: IoU = |P & G| /
    |P | G|, F_beta from precision |P & G| / |P| and recall |P & G| / |G| (0 where undefined), seen = P | G not
    empty. A 255 pixel (our ignore label) is no class's ground truth, but its prediction counts, as the official
    histograms treat a label outside 0..C-1. Returns (iou, f, seen), each (C,)."""
    C = logits.shape[1]
    pred, label = logits.softmax(1).argmax(1).flatten(), label.flatten()
    count = lambda x: torch.bincount(x, minlength=C).double().cpu()
    inter, n_pred, n_gt = count(pred[pred == label]), count(pred), count(label[label < C])
    union = n_pred + n_gt - inter
    p, r = _div(inter, n_pred), _div(inter, n_gt)
    return _div(inter, union), _div((1 + beta2) * p * r, beta2 * p + r), union > 0


class AVSBenchScores:
    """AVSBench's own test over rows[:n] of an AVSBenchDataset (--protocol avsbench), next to SplitMetrics.
    S4 / MS3: a (n, 2 + 255) table of each frame's J, foreground flag and F-curve, batched at the end
    (batch_scores). AVSS: per-class sums of IoU, F and the frames where the class is seen, each padded frame
    of a 5-frame v1s / v1m clip counted as the official test counts it (pred = label = background: IoU = F = 1).
    Every row is filled by one rank, so adding everything up over the ranks (sum_over_ranks) gathers the whole
    split."""

    def __init__(self, dataset, n, test_batch):
        if getattr(dataset, 'subset', None) not in data.AVSBENCH or not hasattr(dataset, 'rows'):
            raise ValueError(f'--protocol avsbench: AVSBench\'s test needs an AVSBench dataset '
                             f'(--data {", ".join(data.AVSBENCH)})')
        self.rows, self.n, self.test_batch = dataset.rows, n, test_batch
        self.semantic = dataset.subset == 'avss'
        C = dataset.num_classes
        self.SUMS = ('iou_sum', 'f_sum', 'seen') if self.semantic else ('frames',)   # what sum_over_ranks adds up
        self.iou_sum, self.f_sum = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
        self.seen = torch.zeros(C, dtype=torch.int64)
        self.frames = torch.zeros(0 if self.semantic else n, 2 + len(AVSBENCH_THRESHOLDS), dtype=torch.float64)

    def add(self, i, logits, label):
        """Row i's logits (1, C, H, W) and label (1, H, W)."""
        if self.semantic:
            iou, f, seen = avss_frame(logits, label)
            self.iou_sum, self.f_sum, self.seen = self.iou_sum + iou, self.f_sum + f, self.seen + seen.long()
        else:
            j, fg, curve = avsbench_frames(logits, label)
            self.frames[i] = torch.cat([j.double(), fg.double(), curve[0]]).cpu()

    def padded(self):
        """Frames the official avss loader adds to the clips in rows[:n] (10 minus the subset's frames each)."""
        clips = {(r['subset'], r['video']) for r in self.rows[:self.n]}
        return sum(AVSS_CLIP - data.AVSS_FRAMES[s] for s, _ in clips)

    def result(self):
        if not self.semantic:
            batches = video_batches(self.rows, self.n, self.test_batch)
            t = self.frames
            j, f = batch_scores(t[:, 0], t[:, 1] > 0, t[:, 2:], batches)
            return dict(protocol='avsbench', J=j, F=f, test_batch=self.test_batch, batches=len(batches), frames=self.n)
        pad = self.padded()
        iou, f, seen = self.iou_sum.clone(), self.f_sum.clone(), self.seen.clone()
        iou[0], f[0], seen[0] = iou[0] + pad, f[0] + pad, seen[0] + pad    # background, predicted right
        per = {'J': _div(iou, seen.double()), 'F': _div(f, seen.double())}
        out = {k: [x.item() if s else None for x, s in zip(v, seen > 0)] for k, v in per.items()}
        return dict(protocol='avsbench', J=per['J'].mean().item(), F=per['F'].mean().item(), frames=self.n,
                    padded_frames=pad, per_class=dict(out, frames=seen.tolist()))


def avsbench_table(a, classes):
    """Markdown of an AVSBenchScores result, values in %: S4 / MS3 one row (J, F, the test batch); AVSS one row per
    class (J = IoU, F, frames where seen; '-' never seen, 0 in the mean) and the mean over all classes."""
    fmt = lambda x: '-' if x is None else f'{100 * x:.2f}'
    if 'per_class' not in a:
        videos = f"{a['test_batch']} video{'s' * (a['test_batch'] > 1)}"
        return '\n'.join(['| J | F | test batch | batches | frames |', '|---:|---:|---:|---:|---:|',
                          f"| {fmt(a['J'])} | {fmt(a['F'])} | {videos} | {a['batches']} | {a['frames']} |"])
    pc = a['per_class']
    lines = ['| class | J (IoU) | F | frames |', '|---|---:|---:|---:|']
    lines += [f"| {c} | {fmt(pc['J'][k])} | {fmt(pc['F'][k])} | {pc['frames'][k]} |" for k, c in enumerate(classes)]
    lines.append(f"| **mean of {len(classes)}** | {fmt(a['J'])} | {fmt(a['F'])} | {a['frames']} "
                 f"+ {a['padded_frames']} padded |")
    return '\n'.join(lines)


PROTOCOL_TITLES = {'cavp': "protocol cavp: the paper's dataset-level mIoU / F_beta / FDR (Tables 2-4) and "
                           "per-image J / F",
                   'avsbench': "protocol avsbench: AVSBench's own test (its test.py; the paper's Table 1)"}


def report(m, classes):
    """The printed result of evaluate(): a line naming the protocol, then its table (avsbench_table when the
    'avsbench' numbers are there, else format_table)."""
    if 'avsbench' in m:
        return f"{PROTOCOL_TITLES['avsbench']}\n\n{avsbench_table(m['avsbench'], classes)}"
    return f"{PROTOCOL_TITLES['cavp']}\n\n{format_table(m, classes)}"


SKIPS = ('no instance map', 'no clip')   # why a probe skips a sample (Probes); stereo has the first only


class Probes:
    """The audio probes (Figs. 1, 13, 14) on datasets with `load` and `rows` (VPODataset). Each takes the
    image with another audio, a re-mix of its own clips:
      cf      counterfactual (Figs. 1, 14): images with >= 2 VPO classes get the audio of
              counterfactual_class() (load(i, sounding=its objects)), scored against its instances
      silence, noise   hallucination: share of all pixels predicted foreground under load(i, audio=...)
      swap    stereo (Fig. 13), VPO-MSMI, on mirror_pair() samples: with the
              original audio, does the class-c prediction cover a larger fraction of the sounding instance
              s than of its mirror m; with L and R swapped (load(i, swap=True)), does it move to m.
    Re-choosing the sounding objects (cf, swap) needs the instance map, which the official release lacks.
    A sample a probe cannot take is counted in cf_skipped / stereo_skipped by reason (SKIPS): 'no instance
    map', or for cf 'no clip' (>= 2 classes, but every class it could play has no audio). The stereo probe
    plays the sample's own clips, swapped, and reads m's mask without its sound: it needs no other clip."""
    SUMS = ('conf_cf', 'cf_n', 'fg_px', 'total_px', 'stereo_n', 'stereo_hit', 'swap_hit', 'cf_skipped',
            'stereo_skipped')   # what sum_over_ranks adds up

    def __init__(self, dataset, enabled=True):
        self.dataset, self.C = dataset, dataset.num_classes
        self.on = enabled and hasattr(dataset, 'load') and hasattr(dataset, 'rows')
        # a --mono model (Table 8, Fig. 7) is probed too: it hears L + R, the same after the swap, so its
        # stereo_acc says how often it finds the sounding instance without the cue
        self.stereo = getattr(dataset, 'subset', None) == 'vpo_msmi'
        self.conf_cf, self.cf_n = torch.zeros(self.C, self.C, dtype=torch.int64), 0
        self.fg_px, self.total_px = {'silence': 0, 'noise': 0}, 0
        self.stereo_n, self.stereo_hit, self.swap_hit = 0, 0, 0
        self.cf_skipped, self.stereo_skipped = dict.fromkeys(SKIPS, 0), dict.fromkeys(SKIPS[:1], 0)

    def samples(self, i, sample):
        """{name: sample dict} of sample i's probe audios, in batch order; 'cf' carries its class in
        'cls', 'swap' its mirror_pair in 'pair'. Empty when the probes are off."""
        if not self.on:
            return {}
        load, row = self.dataset.load, self.dataset.rows[i]
        objects, rechoose = row['objects'], bool(row.get('inst'))
        out = {}
        c = counterfactual_class(objects) if rechoose else None
        if not rechoose:
            self.cf_skipped['no instance map'] += 1
            self.stereo_skipped['no instance map'] += self.stereo
        elif c is None and len({o['cls'] for o in objects}) >= 2:
            self.cf_skipped['no clip'] += 1
        if c is not None:   # Figs. 1, 14: another present class's audio; its instances are the target
            out['cf'] = {**load(i, sounding=[k for k, o in enumerate(objects) if o['cls'] == c]), 'cls': c}
        for kind in ('silence', 'noise'):
            out[kind] = load(i, audio=kind)
        pair = mirror_pair(objects) if self.stereo and rechoose else None
        if pair is not None:   # Fig. 13: L and R swapped, image unchanged
            out['swap'] = {**load(i, swap=True), 'pair': pair}
        return out

    def add(self, i, label, preds, samples):
        """label (1, H, W); preds: {name: (1, H, W) prediction} for 'original' and every probe sample."""
        if 'cf' in samples:
            self.conf_cf += confusion_matrix(preds['cf'], samples['cf']['label'][None].to(label.device), self.C).cpu()
            self.cf_n += 1
        if self.on:
            for kind in self.fg_px:
                self.fg_px[kind] += (preds[kind] != 0).sum().item()
            self.total_px += label.numel()
        if 'swap' in samples:
            self._add_stereo(i, label, preds['original'][0], preds['swap'][0], samples['swap']['pair'])

    def _add_stereo(self, i, label, pred, pred_swap, pair):
        """Instance masks of s (its class in the label) and m (load with m sounding); pred (H, W)."""
        s, m = pair
        k = self.dataset.classes.index(self.dataset.rows[i]['objects'][s]['cls'])
        inst_s = label[0] == k
        inst_m = self.dataset.load(i, sounding=[m], audio='silence')['label'].to(label.device) == k   # no clip read
        cover = lambda p, mask: (p & mask).sum().item() / max(mask.sum().item(), 1)
        self.stereo_n += 1
        self.stereo_hit += cover(pred == k, inst_s) > cover(pred == k, inst_m)
        self.swap_hit += cover(pred_swap == k, inst_m) > cover(pred_swap == k, inst_s)

    def result(self):
        frac = lambda a, b: a / b if b else None
        return dict(cf_miou=semantic_scores(self.conf_cf)['miou'] if self.conf_cf.sum() else None, cf_n=self.cf_n,
                    halluc_silence=frac(self.fg_px['silence'], self.total_px),
                    halluc_noise=frac(self.fg_px['noise'], self.total_px),
                    stereo_acc=frac(self.stereo_hit, self.stereo_n),
                    stereo_swap_acc=frac(self.swap_hit, self.stereo_n), stereo_n=self.stereo_n,
                    cf_skipped=dict(self.cf_skipped), stereo_skipped=dict(self.stereo_skipped))


def sum_over_ranks(obj, device):
    """Add up obj's running sums (the names in obj.SUMS: tensors, numbers, dicts of numbers) over the processes of
    torch.distributed, in place, so that every rank holds the totals of the whole split. Counts stay exact (int64);
    float sums differ from one process's only by the order of addition."""
    import torch.distributed as dist
    for name in obj.SUMS:
        value = getattr(obj, name)
        keys = sorted(value) if isinstance(value, dict) else None
        items = [value[k] for k in keys] if keys else [value]
        for k, v in enumerate(items):
            t = v.to(device) if torch.is_tensor(v) else torch.tensor(v, dtype=torch.float64 if isinstance(v, float)
                                                                    else torch.int64, device=device)
            dist.all_reduce(t)
            items[k] = t.cpu() if torch.is_tensor(v) else t.item()
        setattr(obj, name, dict(zip(keys, items)) if keys else items[0])


@torch.inference_mode()
def evaluate(model, dataset, device, *, amp_dtype=None, probes=True, vis=0, vis_dir=None, max_samples=None,
             progress=True, rank=0, world=1, protocol='cavp', test_batch=None):
    """Stream over `dataset` (batch 1, metrics at label resolution) and return a metrics dict (fractions in [0, 1]):
      miou, fbeta, fdr, per_class            semantic_scores of the summed confusion matrix (Sec. 5.1)
      J, F                                   means over images of mask_iou / f_score (SplitMetrics; empty-gt and
                                             all-ignore images: see there)
      classes, n                             class names, samples evaluated
      cf_miou, cf_n                          counterfactual probe: dataset-level mIoU over its samples (Probes)
      cf_skipped, stereo_skipped             samples a probe skipped, by reason (Probes, SKIPS)
      halluc_silence, halluc_noise           share of all pixels predicted foreground under silence / noise
      stereo_acc, stereo_swap_acc, stereo_n  stereo probe, VPO-MSMI only (else None)
      protocol                               'cavp': every number above is ours (the paper's, Tables 2-4)
      avsbench                               protocol='avsbench' only: AVSBench's own test numbers of the same
                                             predictions (AVSBenchScores; test_batch videos per batch, default 4)
    vis > 0 writes PNGs of the first `vis` samples to vis_dir. Probe values are None when no sample
    qualifies or probes=False. The model's train/eval mode is restored afterwards. A sample that fails
    raises SampleError, one line naming it and its file (sample_name) with the cause.
    Under torch.distributed (world > 1) each rank evaluates samples rank, rank + world, ... and the sums are added
    up over the ranks (sum_over_ranks): every rank returns the whole split's metrics, those of one process."""
    if vis and not vis_dir:
        raise ValueError('evaluate: vis > 0 needs vis_dir')
    device = torch.device(device)
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    metrics, probe = SplitMetrics(dataset.num_classes), Probes(dataset, probes)
    batch = resolve_test_batch(protocol, test_batch, getattr(dataset, 'subset', None))
    official = AVSBenchScores(dataset, n, batch) if protocol == 'avsbench' else None
    was_training, i = model.training, None
    model.eval()
    try:
        for i in _progress(range(rank, n, world), progress):
            s = dataset[i]
            x, label = s['image'][None].to(device), s['label'][None].to(device)   # (1, 3, H, W), (1, H, W)
            extra = probe.samples(i, s)
            # the original and every probe audio in one batch: the image branch runs once
            audios = torch.stack([s['audio']] + [e['audio'] for e in extra.values()]).to(device)  # 1 + k, A, T, F
            logits, attn = runner(model, x, amp, label.shape[-2:])(audios)        # 1 + k, C, H, W
            preds = dict(zip(['original', *extra], logits.argmax(1, keepdim=True)))   # name -> (1, H, W)
            metrics.add(logits[:1], label)
            if official:
                official.add(i, logits[:1], label)
            probe.add(i, label, preds, extra)
            if i < vis:
                # panels: the original, the counterfactual (titled by its class), silence and noise
                audio_preds = [(extra.get(k, {}).get('cls', k), p) for k, p in preds.items() if k != 'swap']
                save_picture(os.path.join(vis_dir, f'{i:05d}.png'), s['image'], s['label'], preds['original'][0],
                             _attn_map(attn[:1], tuple(label.shape[-2:])), audio_preds, list(dataset.classes))
    except Exception as e:   # any failure, data or model: say which sample, so it can be found and fixed
        if i is None:
            raise
        cause = (str(e).splitlines() or [''])[0]
        raise SampleError(f'{sample_name(dataset, i)}: {type(e).__name__}: {cause}') from e
    finally:
        model.train(was_training)
    if world > 1:
        for sums in (metrics, probe, official):
            if sums:
                sum_over_ranks(sums, device)
    m = semantic_scores(metrics.conf)
    m.update(classes=list(dataset.classes), n=n, **metrics.per_image(), **probe.result(), protocol='cavp')
    if official:
        m['avsbench'] = official.result()
    return m


class SampleError(ValueError):
    """evaluate() failed on one sample: the message names it and its file, in one line."""


def sample_name(dataset, i):
    """'sample i (<id>, <manifest>:<line>)' for a row of a VPO manifest; for other rows (the official
    release's, AVSBench frames) the image file in place of the manifest line."""
    rows = getattr(dataset, 'rows', None)
    row = rows[i] if rows is not None and i < len(rows) else {}
    manifest = getattr(dataset, 'manifest', None)
    where = f'{manifest}:{i + 1}' if manifest and os.path.isfile(manifest) else row.get('image')
    tags = [str(t) for t in (row.get('id'), where) if t]
    return f'sample {i}' + (f" ({', '.join(tags)})" if tags else '')


def _progress(it, on):
    if not on:
        return it
    from tqdm import tqdm   # only where a bar is shown
    return tqdm(it, desc='evaluate', dynamic_ncols=True)

# -----------------------------------------------------------------------------------------------
# pictures (App. C, Figs. 1, 10-14): PIL only


PANEL_W, TITLE_H = 320, 14


def _panel(rgb, title, nearest):
    """A uint8 (H, W, 3) array -> PIL panel PANEL_W wide with a title strip on top."""
    im = Image.fromarray(rgb)
    h = max(1, round(im.height * PANEL_W / im.width))
    im = im.resize((PANEL_W, h), Image.NEAREST if nearest else Image.BILINEAR)
    out = Image.new('RGB', (PANEL_W, h + TITLE_H), (255, 255, 255))
    out.paste(im, (0, TITLE_H))
    ImageDraw.Draw(out).text((2, 1), title[:52], fill=(0, 0, 0))
    return out


def _grid(rows):
    """Rows of panels -> one white canvas, rows stacked, panels left to right."""
    canvas = Image.new('RGB', (PANEL_W * max(len(r) for r in rows), sum(r[0].height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        for k, p in enumerate(r):
            canvas.paste(p, (k * PANEL_W, y))
        y += r[0].height
    return canvas


def _attn_map(attn, size):
    """The fusion's attention (Sec. 4.1: sigmoid(q k^T / sqrt(d)) of each pixel query against the one audio
    token), (1, heads, h, w), as an (H, W) map for display: mean over heads, bilinear-upsampled, min-max
    scaled (the raw range goes in the panel title). Returns (map, raw min, raw max)."""
    a = attn[0].float().mean(0)                                          # heads, h, w -> h, w
    a = F.interpolate(a[None, None], size=size, mode='bilinear', align_corners=False)[0, 0]   # H, W
    lo, hi = a.min().item(), a.max().item()
    return (a - lo) / max(hi - lo, 1e-12), lo, hi


def _heat_panel(attn_map, title):
    a, lo, hi = attn_map
    v = a.cpu().numpy()
    heat = np.stack([v * 3, v * 3 - 1, v * 3 - 2], -1).clip(0, 1)        # black-red-yellow-white
    return _panel((heat * 255).astype(np.uint8), f'{title} [{lo:.2f}, {hi:.2f}]', False)


def _names(pred, classes):
    return ', '.join(classes[k] for k in pred.unique().tolist() if 0 < k < len(classes)) or 'none'


def save_picture(path, image, label, pred, attn_map, audio_preds, classes):
    """One PNG per sample: image | ground truth | prediction | attention map (_attn_map's triple or
    None), and below, when the probes ran, the prediction under each audio: [(name, (1, H, W) pred)]
    for the original, the counterfactual class, silence and noise."""
    img = image.float().cpu().permute(1, 2, 0).numpy() * data.STD + data.MEAN          # H, W, 3
    pal = data.palette()
    gt, pr = label.cpu(), pred.cpu()
    row = [_panel((img.clip(0, 1) * 255).astype(np.uint8), 'image', False),
           _panel(pal[gt.numpy()], f'GT: {_names(gt, classes)}', True),
           _panel(pal[pr.numpy()], f'pred: {_names(pr, classes)}', True)]
    if attn_map is not None:
        row.append(_heat_panel(attn_map, 'attn'))
    rows = [row]
    if len(audio_preds) > 1:
        rows.append([_panel(pal[p[0].cpu().numpy()], f'audio {a}: {_names(p[0].cpu(), classes)}', True)
                     for a, p in audio_preds])
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    save_image(_grid(rows), path)

# -----------------------------------------------------------------------------------------------
# output folders and files: one writer per folder, every file whole or not at all


LOCK = '.lock'   # in each output folder: held (flock) by the process that writes there, and holds its pid


def write_whole(path, write):
    """write(tmp) makes the file under a temporary name of this process's own, then one rename puts it at path: a
    reader (--summary over runs still going, a picture viewer) sees the previous file or the new one, never a part;
    a process killed mid-write leaves at most its temporary, never half a file at path."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    write_whole(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))


def save_image(image, path):
    """A PIL image written whole (write_whole), in the format its extension names."""
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None:   # the temporary name has no extension to tell Pillow the format: say it here
        raise ValueError(f'{path}: unknown picture extension (use .png or .jpg)')
    write_whole(path, lambda tmp: image.save(tmp, format=fmt))


def _lock(folder):
    """An open descriptor of folder/LOCK with an exclusive flock on it, or None when another process holds it. The
    lock lasts until the descriptor is closed or the process ends in any way (the operating system drops it, so a
    kill -9 leaves nothing stale to remove by hand). The file itself stays: a process that opened it just before
    an unlink could lock the old file while another locks a new one."""
    fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()}\n'.encode())
    return fd


def hold_folder(folder, flag):
    """Lock an existing output folder for this process (_lock) or raise one line naming `flag`, the folder and the
    live process that writes there: a folder has one writer. Returns the descriptor (os.close releases it)."""
    fd = _lock(folder)
    if fd is None:
        try:
            with open(os.path.join(folder, LOCK)) as f:
                pid = f.read().strip()
        except OSError:
            pid = ''
        raise ValueError(f'{flag}: {folder} is in use by the live process {pid or "that holds its " + LOCK}: a '
                         f'folder has one writer; wait until that process ends (its lock ends with it)')
    gone = remove_stale_temporaries(folder)
    if gone:
        print(f'{folder}: removed {len(gone)} temporaries of ended writers ({", ".join(map(os.path.basename, gone))})')
    return fd


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        pass
    return True


def remove_stale_temporaries(folder):
    """Delete what write_whole's writers killed mid-write left in folder (and below it): `<name>.<pid>.tmp` whose
    process is gone, a checkpoint's worth of disk each. The files a live process is writing stay. Returns the paths
    removed."""
    removed = []
    for root, _, names in os.walk(folder):
        for name in names:
            m = re.search(r'\.(\d+)\.tmp$', name)
            if m and not _alive(int(m.group(1))):
                os.remove(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    return sorted(removed)


def _unused(folder):
    return os.path.isdir(folder) and set(os.listdir(folder)) <= {LOCK}


def claim_folder(base):
    """A folder of this process's own: base, else the first of base-2, base-3, ... that holds no output yet, made
    and locked (_lock) before anything is written. os.mkdir is atomic: of processes making one path at the same
    moment exactly one succeeds, and the others go on to the next name. A folder that exists but is empty (or
    holds only the lock of a process that died before writing) is taken by whoever locks it first, and a process
    whose mkdir succeeded but lost that race moves on. Returns (path, lock descriptor)."""
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    for n in itertools.count(1):
        path = base if n == 1 else f'{base}-{n}'
        try:
            os.mkdir(path)
        except FileExistsError:
            if not _unused(path):
                continue
        try:
            fd = _lock(path)
        except FileNotFoundError:   # an empty folder removed meanwhile: try the next name
            continue
        if fd is not None and _unused(path):
            return path, fd
        if fd is not None:
            os.close(fd)

# -----------------------------------------------------------------------------------------------
# checkpoints: tensors and plain Python values only, read without running code


CKPT_KEYS = ('data', 'num_classes', 'mono', 'backbone', 'output_stride', 'attn', 'heads', 'audio_seconds')
CKPT_OPTIONAL = ('dim', 'audio_backbone')  # passed when saved, else CAVP's defaults


def read_checkpoint(path, *, flag='--ckpt'):
    """The dict of a train.py checkpoint, read with torch.load(weights_only=True): tensors and plain Python
    values only (dict, list, tuple, str, int, float, bool, None), so loading it cannot run code. Bad files
    raise one line naming `flag` and path: FileNotFoundError when missing, else ValueError (empty,
    truncated or corrupt, holding pickled Python objects, not a dict with 'model' and 'args', or model
    weights with a NaN / inf, where the first such tensor is named)."""
    where = f'{flag} {path}'
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{where}: no such file')
    if os.path.getsize(path) == 0:
        raise ValueError(f'{where}: empty file (0 bytes)')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        if refused:
            raise ValueError(f'{where} holds arbitrary Python objects ({refused.group(1)}); it is refused because '
                             f'loading it could run code') from None
        raise ValueError(f'{where}: not a torch checkpoint, or a corrupt one') from None
    except Exception as e:   # torch.load fails on damaged bytes in many ways (zip reader, EOF, unpickler)
        raise ValueError(f'{where}: truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:80]})') from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict) or not isinstance(ckpt.get('args'), dict):
        raise ValueError(f"{where}: not a train.py checkpoint (a dict with a 'model' state dict and an 'args' dict)")
    for name, w in ckpt['model'].items():
        if not torch.is_tensor(w):
            raise ValueError(f'{where}: model entry {name} is a {type(w).__name__}, not a tensor')
        if w.is_floating_point() and not torch.isfinite(w).all():
            raise ValueError(f'{where}: model weight {name} has non-finite values (NaN or inf)')
    return ckpt


def load_checkpoint(path, device, *, data=None, num_classes=None, mono=None):
    """(model in eval mode on device, args dict) from a train.py checkpoint (read_checkpoint), CAVP rebuilt
    from ckpt['args'] and loaded strictly (no silent strict=False). data / num_classes / mono, when given,
    must match what the checkpoint was trained with; errors (ValueError) name what differs."""
    ckpt = read_checkpoint(path)
    args = ckpt['args']
    missing = [k for k in CKPT_KEYS if k not in args]
    if missing:
        raise ValueError(f'--ckpt {path}: its args lack {missing}')
    if mono is not None and args['mono'] != mono:  # Fig. 7 / Table 8: say which flag fixes it
        raise ValueError(f"--ckpt {path} is a {'mono' if args['mono'] else 'stereo'} checkpoint "
                         f"(mono={args['mono']}): {'pass' if args['mono'] else 'drop'} --mono")
    for key, flag, want in (('data', '--data', data), ('num_classes', 'class count', num_classes)):
        if want is not None and args[key] != want:
            raise ValueError(f'--ckpt {path} was trained with {key}={args[key]!r}, but {flag} asks for {want!r}')
    from model import CAVP  # imported here: the metric functions need no model code
    model = CAVP(num_classes=args['num_classes'], backbone=args['backbone'], output_stride=args['output_stride'],
                 audio_channels=1 if args['mono'] else 2, attn=args['attn'], heads=args['heads'],
                 **{k: args[k] for k in CKPT_OPTIONAL if args.get(k) is not None})
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        raise ValueError(f"--ckpt {path}: its weights do not fit the CAVP rebuilt from its args: "
                         f"{' '.join(str(e).split())[:300]}") from None
    return model.to(device).eval(), args

# -----------------------------------------------------------------------------------------------
# --summary: runs over seeds, mean +- std per setting


SUMMARY_METRICS = ('miou', 'fbeta', 'fdr', 'cf_miou', 'halluc_silence', 'stereo_acc', 'stereo_swap_acc')
# train.py arguments left out when grouping runs: the seed (what a row averages over) and bookkeeping that
# cannot change a result: where the run is written, its pictures, loader processes (augmentation is a pure
# function of seed, epoch and index), and resuming (a resumed run continues exactly).
NOT_A_SETTING = ('seed', 'name', 'out', 'vis', 'workers', 'resume', 'test_only', 'protocol',
                 'test_batch')   # cannot change a result: the protocol only adds AVSBench's numbers


def read_run(folder):
    """metrics.json of a train.py run folder (it holds the run's arguments under 'args')."""
    path = os.path.join(folder, 'metrics.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--summary {folder}: no metrics.json there (not a finished train.py run)')
    try:
        with open(path) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f'--summary {path}: not valid JSON ({e})') from None
    if not isinstance(m, dict) or not isinstance(m.get('args'), dict):
        raise ValueError(f"--summary {path}: no 'args' (written by train.py? evaluate.py's own metrics.json has none)")
    return m


def group_runs(runs):
    """[(setting, [metrics dicts])] in order of first appearance; a setting is a run's args without
    NOT_A_SETTING, and runs with equal settings share a group."""
    groups = {}
    for m in runs:
        setting = {k: v for k, v in m['args'].items() if k not in NOT_A_SETTING}
        groups.setdefault(json.dumps(setting, sort_keys=True), (setting, []))[1].append(m)
    return list(groups.values())


def _flag(key, value):
    """An argument as on the command line: `--contrast none`, `--mono`; unset (False / None) as `(no --x)`."""
    flag = '--' + key.replace('_', '-')
    if value is True:
        return flag
    if value is False or value is None:
        return f'(no {flag})'
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"


def mean_std(values):
    """'mean ± std' (sample std, 3 decimals); one value: 'mean ± -'; none: '-'."""
    if not values:
        return '-'
    std = f'{statistics.stdev(values):.3f}' if len(values) > 1 else '-'
    return f'{statistics.mean(values):.3f} ± {std}'


def summary_table(folders):
    """Markdown: one row per group of runs (group_runs), first the arguments that tell the groups apart,
    then n and mean ± std of each SUMMARY_METRICS key present (metrics.json units: fractions). A metric
    that only some runs of a group have is averaged over those, their count in brackets."""
    runs = [read_run(f) for f in folders]
    groups = group_runs(runs)
    keys = sorted({k for setting, _ in groups for k in setting})
    differ = [k for k in keys if len({json.dumps(s.get(k)) for s, _ in groups}) > 1]
    cols = [k for k in SUMMARY_METRICS if any(m.get(k) is not None for m in runs)]
    lines = ['| setting | n | ' + ' | '.join(cols) + ' |', '|---|---:|' + '---:|' * len(cols)]
    for setting, ms in groups:
        cells = []
        for k in cols:
            v = [m[k] for m in ms if m.get(k) is not None]
            cells.append(mean_std(v) + (f' ({len(v)})' if 0 < len(v) < len(ms) else ''))
        flags = ' '.join(_flag(k, setting.get(k)) for k in differ) or 'all runs'
        lines.append(f'| `{flags}` | {len(ms)} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)

# -----------------------------------------------------------------------------------------------
# your own image and sound


def _check_file(path, flag):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{flag} {path}: no such file')
    if os.path.getsize(path) == 0:
        raise ValueError(f'{flag} {path}: empty file (0 bytes)')


def read_image(path):
    """Any image Pillow opens (RGB, L, RGBA, P, ...) as PIL RGB, turned upright by its EXIF orientation."""
    _check_file(path, '--image')
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert('RGB')
    except (OSError, ValueError, SyntaxError) as e:   # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f'--image {path}: not an image Pillow can read ({e})') from None


def read_audio(path, seconds):
    """(channels, L) float32, channels 1 or 2 as recorded, L = seconds at 16 kHz: data.read_clip's centre window,
    resampling and tiling, keeping the channels."""
    _check_file(path, '--audio')
    try:
        info = sf.info(path)
    except (RuntimeError, OSError, ValueError, TypeError) as e:   # soundfile's errors are RuntimeErrors
        raise ValueError(f'--audio {path}: not an audio file soundfile can read ({e})') from None
    if info.frames == 0:
        raise ValueError(f'--audio {path}: holds no samples')
    if info.channels > 2:
        raise ValueError(f'--audio {path}: {info.channels} channels; expected mono or stereo')
    try:
        return data.read_clip(path, seconds, mono=False)
    except RuntimeError as e:
        raise ValueError(f'--audio {path}: {e}') from None


def audio_input(wave, args, alpha=0.5):
    """(channels, L) waveform -> the model's (A, T, F) input for a checkpoint's args, as VPODataset builds
    it: a stereo model pans a mono clip at alpha (vpo.pan: 0 left, 1 right; no interaural delay) and takes a
    stereo clip as recorded, each channel its own log-mel; a mono model (--mono) averages the channels;
    AVSBench checkpoints take the VGGish example of the mono window (data.vggish_audio)."""
    if args['data'] in data.AVSBENCH:
        return data.vggish_audio(torch.from_numpy(wave.mean(0, keepdims=True)))        # 1, 96, 64
    if args['mono']:
        wave = wave.mean(0, keepdims=True)                                             # 1, L
    elif len(wave) == 1:
        wave = vpo.pan(wave[0], alpha, sr=data.SR)                                     # 2, L
    return data.logmel(torch.from_numpy(np.ascontiguousarray(wave)))                   # A, T, 64


def image_input(image, args, test_scale=None):
    """PIL RGB -> (1, 3, h, w) as the test split sees it: AVSBench checkpoints at --resize x --resize when
    trained so, VPO ones rescaled by test_scale (default the checkpoint's), ImageNet-normalised."""
    if args['data'] in data.AVSBENCH and args.get('resize'):
        image = image.resize((args['resize'],) * 2, Image.BILINEAR)
    else:
        image = data.rescale(image, test_scale or args.get('test_scale') or 1.0)
    return data.normalise(image)[None]


def check_alpha(alpha):
    if not 0 <= alpha <= 1:
        raise ValueError(f'--alpha {alpha}: expected a position in [0, 1] (0 left, 1 right)')


def network_inputs(rgb, waves, args, *, alpha=0.5, test_scale=None):
    """The network's inputs for one PIL RGB image and k (channels, L) waveforms, built as the test split builds
    them (image_input, audio_input): {'image': (1, 3, h, w), 'audio': (k, A, T, F), 'size': the image's own
    (H, W), 'rgb': the image}. The one path from pixels and samples to tensors for --image and --video."""
    check_alpha(alpha)
    audio = torch.stack([audio_input(w, args, alpha) for w in waves])                       # k, A, T, F
    return {'image': image_input(rgb, args, test_scale), 'audio': audio, 'size': (rgb.height, rgb.width), 'rgb': rgb}


def silence(args):
    """(1, L) zeros: a window of the checkpoint's length without sound."""
    return np.zeros((1, int(round(args['audio_seconds'] * data.SR))), np.float32)


def predict_inputs(image_path, clip_paths, args, *, alpha=0.5, test_scale=None):
    """network_inputs for an image file and k clip files, the clips then silence: 'audio' is (k + 1, A, T, F)."""
    check_alpha(alpha)   # before reading any file
    rgb = read_image(image_path)
    waves = [read_audio(p, args['audio_seconds']) for p in clip_paths] + [silence(args)]
    return network_inputs(rgb, waves, args, alpha=alpha, test_scale=test_scale)


@torch.inference_mode()
def segment(model, inp, device, amp_dtype=None):
    """(k, H, W) int64 class indices and (k, heads, h, w) float32 attention, both on the CPU, for network_inputs'
    dict: the image branch once, its k audios in one batch, logits at the image's own size."""
    device = torch.device(device)
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    logits, attn = runner(model, inp['image'].to(device), amp, inp['size'])(inp['audio'].to(device))
    return logits.argmax(1).cpu(), attn.float().cpu()


def class_names(args, root=None):
    """The checkpoint's class names: VPO's 22, AVSBench S4 / MS3 background / foreground, AVSS from
    label2idx.json under root (default the checkpoint's --root), else 'class k'. The count must match."""
    if args['data'] in data.VPO_SUBSETS:
        names = list(vpo.VPO_CLASSES)
    elif args['data'] in ('s4', 'ms3'):
        names = list(data.BINARY_CLASSES)
    else:
        path = os.path.join(root or args.get('root') or '', 'label2idx.json')
        idx = {f'class {k}': k for k in range(args['num_classes'])}
        if os.path.isfile(path):
            with open(path) as f:
                idx = json.load(f)
        names = sorted(idx, key=idx.get)
    if len(names) != args['num_classes']:
        raise ValueError(f"the checkpoint has {args['num_classes']} classes, "
                         f"but --data {args['data']} has {len(names)}")
    return names


def describe(pred, classes):
    """'dog 12.3%, cat 4.0%': the classes in an (H, W) prediction, largest share of the image first."""
    share = torch.bincount(pred.flatten().cpu(), minlength=len(classes)).double() / pred.numel()
    found = [k for k in share.argsort(descending=True).tolist() if k > 0 and share[k] > 0]
    return ', '.join(f'{classes[k]} {100 * share[k]:.1f}%' for k in found) or 'nothing (all background)'


def overlay(rgb, pred):
    """PIL RGB image and its (H, W) class indices -> uint8 (H, W, 3): each found class's colour blended over
    the image, background pixels as they were."""
    img = np.asarray(rgb, np.float32)                                               # H, W, 3
    p = pred.cpu().numpy()
    colour = data.palette().astype(np.float32)[p]                                  # H, W, 3
    return np.where((p > 0)[..., None], 0.45 * img + 0.55 * colour, img).astype(np.uint8)


def prediction_picture(rgb, names, preds, attn, classes):
    """The image, then one row per audio: the prediction over the image (class names in the title) and
    the f_CA attention map. preds (k, H, W), attn (k, heads, h, w)."""
    rows = [[_panel(np.asarray(rgb), 'image', False)]]
    for name, p, a in zip(names, preds.cpu(), attn):
        rows.append([_panel(overlay(rgb, p), f'{name}: {_names(p, classes)}', False),
                     _heat_panel(_attn_map(a[None], tuple(p.shape)), f'attn {name}')])
    return _grid(rows)


def predict(model, args, image_path, clip_paths, *, device, alpha=0.5, out='prediction.png', amp_dtype=None,
            test_scale=None):
    """Segment image_path under each clip and under silence (one batch, the image branch once), write the
    picture to `out` and return one line per clip and one for silence: the classes found and their share."""
    classes = class_names(args)
    inp = predict_inputs(image_path, clip_paths, args, alpha=alpha, test_scale=test_scale)
    preds, attn = segment(model, inp, device, amp_dtype)                            # k + 1, H, W
    names = [os.path.basename(p) for p in clip_paths] + ['silence']
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    save_image(prediction_picture(inp['rgb'], names, preds, attn, classes), out)
    return [f'{path}: {describe(p, classes)}' for path, p in zip([*clip_paths, 'silence'], preds)]

# -----------------------------------------------------------------------------------------------
# your own video: frames at --fps, each with the sound around it, streamed through PyAV (FFmpeg)


EPS = 1e-6          # s: timestamps are rationals turned into floats
SOUND_LAG = 5.0     # s of picture decoded past a window's end while no sound reaches it: the track has ended


class SoundWindows:
    """A sound track at 16 kHz as it is decoded, holding only what later windows can need. window(c): the
    (channels, L) window centred on time c, shifted inside the track at its ends (the first and last windows),
    or the whole track tiled when shorter than L, as data.read_clip takes a clip; silence with no samples."""

    def __init__(self, L, channels):
        self.L, self.buf = L, np.zeros((max(channels, 1), 0), np.float32)
        self.first = None       # the track's first sample, counted at 16 kHz from time 0
        self.n = 0              # samples added so far
        self.dropped = 0        # samples forgotten from the front of buf
        self.after = None       # no window centred before this time is asked for any more
        self.ended = channels == 0

    def add(self, x):
        """Append (channels, n) samples."""
        self.buf = np.concatenate([self.buf, x], 1)
        self.n += x.shape[1]
        if self.after is not None:
            self.drop(self.after)

    def heard(self):
        """Seconds of the track decoded so far, from time 0."""
        return ((self.first or 0) + self.n) / data.SR

    def _start(self, c):
        """Where c's window starts, in samples from the track's first one, kept inside what is known."""
        return max(0, min(round(c * data.SR) - self.L // 2 - (self.first or 0), self.n - self.L))

    def ready(self, c):
        wanted = max(0, round(c * data.SR) - self.L // 2 - (self.first or 0)) + self.L
        return self.ended or (self.first is not None and self.n >= wanted)

    def window(self, c):
        if self.n < self.L:     # short (or no) track: tiled whole, as data.read_clip tiles a short clip
            x = self.buf if self.n else np.zeros((len(self.buf), 1), np.float32)
            return np.tile(x, (1, -(-self.L // x.shape[1])))[:, :self.L]
        s = self._start(c) - self.dropped
        return self.buf[:, s:s + self.L].copy()

    def drop(self, c):
        """Forget the samples that no window centred at c or later can need, now and as more are added: all but
        those from c's window on and the last L (the last window may yet be shifted back onto them)."""
        self.after = c
        if self.n >= self.L and self._start(c) > self.dropped:
            cut = self._start(c) - self.dropped
            self.buf, self.dropped = self.buf[:, cut:], self.dropped + cut


def upright(frame):
    """A decoded av.VideoFrame as PIL RGB, turned as its display matrix says (phones store portrait video
    sideways); VideoFrame.rotation is counter-clockwise degrees, as PIL's rotate takes them."""
    image = frame.to_image()
    return image.rotate(frame.rotation, expand=True) if frame.rotation else image


class VideoFrames:
    """(t, rgb, wave) for t = start, start + 1 / fps, ... while the video shows a frame: the frame on screen at
    t (upright PIL RGB) and the sound window of `seconds` centred on t (SoundWindows: (channels, L) float32 at
    16 kHz, channels 1 or 2 as recorded, more mixed down to 2; silence without a sound track). Time 0 is the
    first frame. Streamed: a few frames and seconds of sound are held, whatever the video's length.
    on_sound(x, offset), when set, receives the track from start to the end as it is decoded: (channels, n)
    float32 at the track's own rate, offset in samples from start."""

    def __init__(self, path, seconds, *, fps=1.0, start=0.0, duration=None):
        import av   # only the video command needs the decoder
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f'--fps {fps}: expected frames per second > 0')
        if not (math.isfinite(start) and start >= 0):
            raise ValueError(f'--start {start}: expected seconds >= 0')
        if duration is not None and not (math.isfinite(duration) and duration > 0):
            raise ValueError(f'--duration {duration}: expected seconds > 0')
        _check_file(path, '--video')
        try:
            self.container = av.open(path)
        except av.EOFError:
            raise ValueError(f'--video {path}: holds no frames (it ends before the first)') from None
        except (av.FFmpegError, UnicodeDecodeError) as e:
            raise ValueError(f'--video {path}: not a video FFmpeg can read ({e})') from None
        streams, kind = self.container.streams, self.container.format.name
        if not streams.video or kind == 'image2' or kind.endswith('_pipe'):   # FFmpeg's still-image readers
            what = (': a still image (segment it with --image IMAGE --audio CLIP)' if streams.video else
                    ': no video stream' + (' (a sound file?)' if streams.audio else ''))
            self.container.close()   # after its streams are read: PyAV crashes on them once closed
            raise ValueError(f'--video {path}{what}')
        self.path, self.seconds, self.fps, self.start, self.half = path, seconds, fps, start, seconds / 2
        self.end = start + duration if duration else math.inf
        self.video, self.audio = streams.video[0], (streams.audio[0] if streams.audio else None)
        self.video.codec_context.thread_type = 'AUTO'   # decoding every frame is most of a long video's time
        v = self.video
        self.origin = float(v.start_time * v.time_base) if v.start_time is not None else 0.0
        self.channels = min(self.audio.channels, 2) if self.audio else 0
        self.rate = self.audio.rate if self.audio else None
        length = self.container.duration / av.time_base if self.container.duration else None
        self.expected = max(0, math.ceil((min(self.end, length) - start) * fps - EPS)) if length else None
        self.step = 1 / float(v.average_rate or 25)   # a frame's duration when the file gives none
        self.on_sound = None

    def close(self):
        self.container.close()

    def time(self, k):
        return self.start + k / self.fps

    def _decoded(self):
        """(kind, time from the first frame or None, frame) in decode order, from a little before start."""
        import av
        if self.start > 0:
            try:   # to the keyframe before the first window; a file that cannot seek is read from its start
                self.container.seek(int((self.origin + max(0.0, self.start - self.half - 1.0)) * av.time_base))
            except av.FFmpegError:
                pass
        try:
            for packet in self.container.demux([s for s in (self.video, self.audio) if s is not None]):
                for frame in packet.decode():
                    yield packet.stream.type, (None if frame.time is None else frame.time - self.origin), frame
        except av.FFmpegError as e:
            raise ValueError(f'--video {self.path}: cannot decode it ({e})') from None

    def _sound(self, win, time, frame):
        """Feed decoded sound (None: flush) to the windows at 16 kHz and to on_sound at the track's rate."""
        if win.first is None and frame is not None:
            time = 0.0 if time is None else time
            win.first, self._offset = round(time * data.SR), round((time - self.start) * self.rate)
        for f in self._to16.resample(frame):
            win.add(f.to_ndarray())
        for f in self._keep.resample(frame) if self.on_sound else ():
            x, at = f.to_ndarray(), self._offset
            lo, hi = max(0, -at), x.shape[1]
            if self.end < math.inf:
                hi = min(hi, round((self.end - self.start) * self.rate) - at)
            if hi > lo:
                self.on_sound(x[:, lo:hi], at + lo)
            self._offset = at + x.shape[1]

    def __iter__(self):
        import av
        win = SoundWindows(int(round(self.seconds * data.SR)), self.channels)
        win.drop(self.start)     # sound decoded before start - seconds / 2 is not kept
        if self.audio:
            layout = 'mono' if self.channels == 1 else 'stereo'
            self._to16 = av.AudioResampler('fltp', layout, data.SR)
            self._keep = av.AudioResampler('fltp', layout, self.rate)
            self._offset = 0   # where the next sample at the track's rate lies, in samples from start
        # pending: frames picked for their time, waiting for the sound after it; prev: the last decoded frame,
        # on screen from `seen` to `until`; shown: prev as upright RGB, converted once however often it is picked
        pending, k, prev, shown, seen, until, n = [], 0, None, None, -math.inf, -math.inf, 0
        for kind, time, frame in self._decoded():
            if kind == 'audio':
                self._sound(win, time, frame)
            else:
                time = seen + self.step if time is None else time
                while prev is not None and time > self.time(k) + EPS and self.time(k) < self.end:
                    shown = shown if shown and shown[0] is prev else (prev, upright(prev))
                    pending.append((self.time(k), shown[1]))
                    k += 1
                dur = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else self.step
                prev, seen, until = frame, time, time + dur
            while pending and (win.ready(pending[0][0]) or seen > pending[0][0] + self.half + SOUND_LAG):
                t, rgb = pending.pop(0)
                yield t, rgb, win.window(t)
                n += 1
                win.drop(pending[0][0] if pending else self.time(k))
            if self.time(k) >= self.end and not pending and (win.ended or win.heard() >= self.end):
                break   # the cut is done: the rest of a long video is never decoded
        else:
            if self.audio:
                self._sound(win, None, None)
            win.ended = True
            while prev is not None and self.time(k) < min(self.end, until) - EPS:
                shown = shown if shown and shown[0] is prev else (prev, upright(prev))
                pending.append((self.time(k), shown[1]))
                k += 1
            for t, rgb in pending:
                yield t, rgb, win.window(t)
                n += 1
        if not n:
            raise ValueError(f'--video {self.path}: holds no video frames' if prev is None else
                             f'--start {self.start}: after the end of --video {self.path} ({until:.1f} s)')


class VideoOutputs:
    """What --video writes to `out`: 00000.png ... (the frames' class indices as palette PNGs in data.palette's
    colours), overlay.mp4 (each frame with its coloured mask, at fps, the sound track from start re-encoded as
    AAC) and summary.json. All are written in a hidden folder inside `out` and moved to their names
    (os.replace) only once the run has ended well: a failed run leaves nothing, not even a folder it made."""

    def __init__(self, out, fps, channels=0, rate=None):
        import av
        self.out, self.made, self.rows, self.held = out, not os.path.isdir(out), [], []
        try:
            os.makedirs(out, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix='.partial-', dir=out)
        except OSError as e:
            raise OSError(f'--out {out}: cannot write there ({e.strerror or e})') from None
        self.fps, self.rate, self.picture = Fraction(fps).limit_denominator(1001), rate, None
        self.container = av.open(os.path.join(self.tmp, 'overlay.mp4'), 'w')
        self.layout = 'mono' if channels == 1 else 'stereo'
        self.sound = self.container.add_stream('aac', rate=rate, layout=self.layout) if channels else None

    def add_sound(self, x, offset):
        """(channels, n) float32 at the track's rate, offset samples after the first frame's time."""
        if self.picture is None:    # the file's header waits for the picture's size
            self.held.append((x, offset))
            return
        import av
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x), format='fltp', layout=self.layout)
        frame.sample_rate, frame.pts, frame.time_base = self.rate, offset, Fraction(1, self.rate)
        self.container.mux(self.sound.encode(frame))

    def add(self, t, rgb, pred, classes):
        """One frame: its mask as a PNG, its overlay into the video, its row of summary.json."""
        import av
        name = f'{len(self.rows):05d}.png'
        mask = Image.fromarray(pred.numpy().astype(np.uint8))
        mask.putpalette(data.palette().tobytes())      # L becomes P: the pixel values stay the class indices
        mask.save(os.path.join(self.tmp, name))
        over = Image.fromarray(overlay(rgb, pred))
        if self.picture is None:    # yuv420p needs even sides
            self.picture = self.container.add_stream('libx264' if 'libx264' in av.codecs_available else 'mpeg4',
                                                     rate=self.fps)
            self.picture.width, self.picture.height = over.width + over.width % 2, over.height + over.height % 2
            self.picture.pix_fmt = 'yuv420p'
            for x, offset in self.held:
                self.add_sound(x, offset)
            self.held = []
        canvas = Image.new('RGB', (self.picture.width, self.picture.height))
        canvas.paste(over if over.height <= canvas.height and over.width <= canvas.width else
                     over.resize(canvas.size, Image.BILINEAR))
        frame = av.VideoFrame.from_image(canvas)
        frame.pts = len(self.rows)
        self.container.mux(self.picture.encode(frame))
        share = torch.bincount(pred.flatten(), minlength=len(classes)).double() / pred.numel()
        found = [c for c in share.argsort(descending=True).tolist() if c > 0 and share[c] > 0]
        self.rows.append({'frame': name, 'time': round(t, 3), 'classes': {classes[c]: round(share[c].item(), 5)
                                                                           for c in found}})

    def finish(self, header):
        """Close the video, write summary.json, move everything to its name; return the files' names."""
        for stream in (self.picture, self.sound):
            if stream is not None:
                self.container.mux(stream.encode(None))
        self.container.close()
        with open(os.path.join(self.tmp, 'summary.json'), 'w') as f:
            json.dump({**header, 'frames': self.rows}, f, indent=1)
        names = [r['frame'] for r in self.rows] + ['overlay.mp4', 'summary.json']
        for name in names:
            os.replace(os.path.join(self.tmp, name), os.path.join(self.out, name))
        for name in os.listdir(self.out):   # masks of an earlier, longer run would pass for this run's
            if re.fullmatch(r'\d{5,}\.png', name) and name not in names:
                os.remove(os.path.join(self.out, name))
        shutil.rmtree(self.tmp)
        return names

    def abort(self):
        try:
            self.container.close()
        except Exception:   # a half-made file: it is removed below in any case
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.made:
            shutil.rmtree(self.out, ignore_errors=True)


def clock(t):
    """'01:03.5', from an hour on '1:01:03.5': a time in the video to the tenth of a second."""
    h, tenths = divmod(int(round(t * 10)), 36000)
    m, s = divmod(tenths, 600)
    return (f'{h}:' if h else '') + f'{m:02d}:{s // 10:02d}.{s % 10}'


def sound_note(frames, args, alpha):
    """One line on how the video's sound reaches this checkpoint, or None when it goes in as recorded."""
    if not frames.channels:
        return f'note: --video {frames.path} has no sound track: every window is silence'
    if frames.audio.channels > 2:
        return f'note: its {frames.audio.channels}-channel sound is mixed down to stereo'
    if frames.channels == 1 and not args['mono'] and args['data'] not in data.AVSBENCH:
        return f'note: its sound is mono: panned at --alpha {alpha:g} for this stereo checkpoint'
    return None


def segment_video(model, args, frames, outputs, *, device, alpha=0.5, amp_dtype=None, test_scale=None, bar=None):
    """Each frame of `frames` (VideoFrames) under its window, through network_inputs and segment as an image
    under a clip; into `outputs` (VideoOutputs); yields one line per frame: '00:03.0 dog 12.3%, car 1.1%'."""
    classes = class_names(args)
    frames.on_sound = outputs.add_sound if outputs.sound is not None else None
    for t, rgb, wave in frames:
        pred = segment(model, network_inputs(rgb, [wave], args, alpha=alpha, test_scale=test_scale), device,
                       amp_dtype)[0][0]                                                  # H, W
        outputs.add(t, rgb, pred, classes)
        if bar is not None:
            bar.update()
        yield f'{clock(t)} {describe(pred, classes)}'


def run_video(a):
    if a.image or a.audio:
        raise ValueError('--video goes alone: not with --image / --audio')
    check_alpha(a.alpha)
    model, cargs = load_checkpoint(a.ckpt, a.device, data=a.data)
    frames = VideoFrames(a.video, cargs['audio_seconds'], fps=a.fps, start=a.start, duration=a.duration)
    out = a.out or os.path.splitext(os.path.basename(a.video))[0] + '_cavp'
    header = {'video': a.video, 'ckpt': a.ckpt, 'fps': a.fps, 'start': a.start, 'duration': a.duration,
              'window_seconds': cargs['audio_seconds'], 'sound': ('none', 'mono', 'stereo')[frames.channels],
              'alpha': a.alpha}
    from tqdm import tqdm   # only where a bar is shown
    outputs = None
    try:
        outputs = VideoOutputs(out, a.fps, frames.channels, frames.rate)
        note = sound_note(frames, cargs, a.alpha)     # printed with the first frame, once there is one
        with tqdm(total=frames.expected, unit='frame', disable=None, leave=False, dynamic_ncols=True) as bar:
            for line in segment_video(model, cargs, frames, outputs, device=a.device, alpha=a.alpha,
                                      amp_dtype=AMP[a.amp], test_scale=a.test_scale, bar=bar):
                bar.write(line if note is None else f'{note}\n{line}')    # above the bar
                note = None
        names = outputs.finish(header)
    except BaseException:
        if outputs is not None:
            outputs.abort()
        raise
    finally:
        frames.close()
    masks = names[0] if len(names) == 3 else f'{names[0]} ... {names[-3]}'
    sound = 'with its sound' if frames.channels else 'no sound'
    print(f'wrote {out}/: {masks}, overlay.mp4 ({a.fps:g} fps, {sound}), summary.json')

# -----------------------------------------------------------------------------------------------
# CLI


def get_args(argv=None):
    p = argparse.ArgumentParser(description='Evaluate a CAVP checkpoint (dataset-level mIoU / F_beta / FDR, per-image '
                                'J / F, audio probes, pictures; Sec. 5.1, App. C), summarise runs over seeds '
                                '(--summary), or segment your own image under your own sounds (--image, --audio).')
    # what to evaluate
    p.add_argument('--ckpt', default=None, help='checkpoint written by train.py, e.g. runs/<name>/best.pt')
    p.add_argument('--data', default=None, choices=data.VPO_SUBSETS + data.AVSBENCH,
                   help="dataset; must match the checkpoint's (default: the checkpoint's)")
    p.add_argument('--root', default=None, help="dataset root (default: the checkpoint's --root)")
    p.add_argument('--split', default='test', choices=['test', 'val'], help='split to evaluate')
    p.add_argument('--avss-subsets', nargs='+', default=None, choices=['v1s', 'v1m', 'v2'],
                   help='AVSS only: evaluate these subsets (Table 3 columns)')
    p.add_argument('--test-scale', type=float, default=None, help='VPO: resize images by this factor before the '
                   "network (metrics and predictions stay at original resolution); default the checkpoint's")
    p.add_argument('--mono', action='store_true',
                   help='evaluate a mono checkpoint (Fig. 7 / Table 8); must match how the checkpoint was trained')
    p.add_argument('--protocol', default='cavp', choices=PROTOCOLS, help=PROTOCOL_HELP)
    p.add_argument('--test-batch', type=int, default=None, metavar='N', help=TEST_BATCH_HELP)
    # probes and outputs
    p.add_argument('--no-probes', action='store_true', help='skip the counterfactual / hallucination / stereo probes')
    p.add_argument('--vis', type=int, default=0, help='write PNGs for the first N samples')
    p.add_argument('--max-samples', type=int, default=None, help='evaluate only the first N samples (smoke tests)')
    p.add_argument('--out', default=None, help='evaluation: output folder (default <ckpt folder>/eval_<data>_<split>, '
                   'or -2, -3, ... when that holds an evaluation); with --image: the picture (default prediction.png)')
    # runs over seeds
    bookkeeping = ', '.join('--' + k.replace('_', '-') for k in NOT_A_SETTING)
    p.add_argument('--summary', nargs='+', default=None, metavar='RUN',
                   help='print a markdown table of train.py run folders (their metrics.json): runs whose saved '
                   f'arguments agree except {bookkeeping} (the seed is what a row '
                   'averages over; the others cannot change a result) form one row, with n and mean ± sample std of '
                   + ', '.join(SUMMARY_METRICS) + '; needs no --ckpt')
    # your own image and sound
    p.add_argument('--image', default=None, help='segment this image (any size, any mode Pillow opens) ...')
    p.add_argument('--audio', nargs='+', default=None, metavar='CLIP',
                   help='... under each of these clips (wav / flac / ogg / opus, mono or stereo) and under silence')
    p.add_argument('--alpha', type=float, default=0.5,
                   help='where a mono clip is panned for a stereo checkpoint: 0 left edge, 0.5 centre, 1 right edge')
    # your own video
    p.add_argument('--video', default=None, help='segment this video (any file FFmpeg reads; its own sound track) '
                   'into --out DIR (default <video name>_cavp): per-frame mask PNGs, overlay.mp4, summary.json')
    p.add_argument('--fps', type=float, default=1.0, help='... at this many frames per second (AVSBench: 1)')
    p.add_argument('--start', type=float, default=0.0, help='... from this second on')
    p.add_argument('--duration', type=float, default=None, help='... for this many seconds (default: to the end)')
    # system
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    p.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'], help='autocast dtype for inference')
    return p.parse_args(argv)


AMP = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def run_evaluation(a):
    model, cargs = load_checkpoint(a.ckpt, a.device, data=a.data, mono=a.mono)
    test_batch = resolve_test_batch(a.protocol, a.test_batch, cargs['data'])
    ds = data.build_dataset(cargs['data'], a.root or cargs['root'], a.split, train=False,
                            data_seed=cargs.get('data_seed', 0),
                            audio_seconds=cargs['audio_seconds'], mono=cargs['mono'], resize=cargs.get('resize'),
                            subsets=a.avss_subsets, test_scale=a.test_scale or cargs.get('test_scale') or 1.0)
    if ds.num_classes != cargs['num_classes']:
        raise ValueError(f"--ckpt {a.ckpt} has {cargs['num_classes']} classes, the {cargs['data']} "
                         f'dataset {ds.num_classes}')
    if a.out:   # the folder asked for, unless another process writes there
        os.makedirs(a.out, exist_ok=True)
        out, lock = a.out, hold_folder(a.out, '--out')
    else:   # a new folder, as train.py makes runs: two evaluations at once never share one
        out, lock = claim_folder(os.path.join(os.path.dirname(a.ckpt), f"eval_{cargs['data']}_{a.split}"))
    try:
        m = evaluate(model, ds, a.device, amp_dtype=AMP[a.amp], probes=not a.no_probes, vis=a.vis,
                     vis_dir=os.path.join(out, 'vis'), max_samples=a.max_samples, protocol=a.protocol,
                     test_batch=test_batch)
        m.update(ckpt=a.ckpt, data=cargs['data'], split=a.split, mono=cargs['mono'],
                 test_scale=getattr(ds, 'test_scale', 1.0))
        table = report(m, ds.classes)
        write_json(os.path.join(out, 'metrics.json'), m)
        write_text(os.path.join(out, 'per_class.md'), f"{cargs['data']} {a.split}, {a.ckpt} (in %)\n\n{table}\n")
    finally:
        os.close(lock)
    print(table)
    print(summary(m))
    print(f'wrote {out}/metrics.json, per_class.md' + (f', vis/ ({a.vis} PNGs)' if a.vis else ''))


def run_prediction(a):
    if not a.image or not a.audio:
        raise ValueError('--image and --audio go together: --image IMAGE --audio CLIP [CLIP ...]')
    model, cargs = load_checkpoint(a.ckpt, a.device, data=a.data)
    out = a.out or 'prediction.png'
    for line in predict(model, cargs, a.image, a.audio, device=a.device, alpha=a.alpha, out=out,
                        amp_dtype=AMP[a.amp], test_scale=a.test_scale):
        print(line)
    print(f'wrote {out}')


def main(argv=None):
    a = get_args(argv)
    try:
        if a.summary:
            print(summary_table(a.summary))
        elif a.ckpt is None:
            raise ValueError('--ckpt is required (or --summary RUN [RUN ...])')
        elif a.video:
            run_video(a)
        elif a.image or a.audio:
            run_prediction(a)
        else:
            run_evaluation(a)
    except (ValueError, OSError, KeyError) as e:   # bad input: one line, no traceback
        print(f'error: {e.args[0] if isinstance(e, KeyError) and e.args else e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
