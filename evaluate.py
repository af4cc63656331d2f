"""Evaluation: the paper's dataset-level metrics, AVSBench-style per-image J and F, audio probes that
turn the paper's qualitative figures into numbers, and pictures (Sec. 5.1, Tables 3-4, 8-11, Figs. 1,
7, 10-14, App. C).

    python evaluate.py --data vpo_ss --ckpt runs/<name>/best.pt [--root DIR] [--vis 8] [--mono]

Everything streams over the test split one image at a time (batch 1, App. B.1; the image at the dataset's
test_scale, 1 = original resolution, the labels and so the metrics always at original resolution): only a
confusion matrix and running sums are kept, so memory does not grow with the dataset.
train.py validates with confusion_matrix / semantic_scores, tests with evaluate() and prints format_table().
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

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
    `miou`, `fbeta`, `fdr` are means over classes INCLUDING background, as the paper's tables. A class
    absent from both target and prediction (TP + FP + FN = 0) has no score: None in the per-class lists,
    and it is left out of the means. The other 0/0 cases are 0:
        predicted but never present: IoU 0, P 0, R 0 (0/0), F 0, FDR 1;
        present but never predicted: IoU 0, P 0 (0/0), R 0, F 0, FDR 0 (it made no false discovery;
        Table 11 prints such classes, e.g. 'axe', as FDR 0 with IoU 0), so FDR != 1 - P there.
    Returns {'miou', 'fbeta', 'fdr' (floats in [0, 1]), 'per_class': {'iou', 'precision', 'recall',
    'fbeta', 'fdr': lists of length C, None where absent}}. An all-zero matrix raises ValueError."""
    conf = conf.double()
    tp = conf.diag()
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    seen = (tp + fp + fn) > 0
    if not seen.any():
        raise ValueError('semantic_scores: empty confusion matrix (every pixel ignored?)')
    p, r = _div(tp, tp + fp), _div(tp, tp + fn)
    per = {'iou': _div(tp, tp + fp + fn), 'precision': p, 'recall': r,
           'fbeta': _div((1 + beta2) * p * r, beta2 * p + r), 'fdr': _div(fp, tp + fp)}
    out = {'miou': per['iou'][seen].mean().item(), 'fbeta': per['fbeta'][seen].mean().item(),
           'fdr': per['fdr'][seen].mean().item()}
    out['per_class'] = {k: [v.item() if s else None for v, s in zip(x, seen)] for k, x in per.items()}
    return out


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
    (beta2 P + R) (0 where P = R = 0), and the image scores max_t F_t of its OWN curve. AVSBench instead
    takes the max of the curve averaged over a test batch, so its F depends on the batch size; the mean
    of these per-image values does not. Images with no foreground in gt are NaN (AVSBench skips them
    too), as are images with no valid pixel. prob: foreground probability in [0, 1]."""
    gt = gt.bool()
    valid = torch.ones_like(gt) if valid is None else valid.bool()
    B = prob.shape[0]
    th = torch.linspace(0, 1 - 1e-10, num_thresholds, dtype=torch.float64, device=prob.device)
    # bin k + 1 holds probs in [th[k], th[k+1]); "prob >= th[k]" counts bins k + 1 .. K (suffix sums)
    bins = torch.bucketize(prob.double().flatten(1), th, right=True)   # B, HW in 0..K
    offset = (torch.arange(B, device=prob.device) * (num_thresholds + 1))[:, None]
    v, g = valid.flatten(1), gt.flatten(1) & valid.flatten(1)
    size = B * (num_thresholds + 1)
    all_hist = torch.bincount((bins + offset)[v], minlength=size).view(B, -1)   # B, K + 1
    fg_hist = torch.bincount((bins + offset)[g], minlength=size).view(B, -1)
    n_pred = all_hist.flip(1).cumsum(1).flip(1)[:, 1:].double()       # B, K: #(prob >= th[k])
    tp = fg_hist.flip(1).cumsum(1).flip(1)[:, 1:].double()
    n_gt = g.sum(1, keepdim=True).double()
    p, r = _div(tp, n_pred), _div(tp, n_gt.expand_as(tp))
    f = _div((1 + beta2) * p * r, beta2 * p + r).amax(1)               # B
    return torch.where(n_gt[:, 0] > 0, f, torch.full_like(f, float('nan')))


def format_table(metrics, classes):
    """Markdown per-class table (like Tables 9-11, transposed: one row per class), values in %."""
    pc = metrics['per_class']
    cols = ('iou', 'fbeta', 'precision', 'recall', 'fdr')
    fmt = lambda x: '-' if x is None else f'{100 * x:.2f}'
    lines = ['| class | IoU | F_beta | precision | recall | FDR |', '|---|---:|---:|---:|---:|---:|']
    lines += [f'| {c} | ' + ' | '.join(fmt(pc[k][i]) for k in cols) + ' |' for i, c in enumerate(classes)]
    lines.append(f"| **mean** | {fmt(metrics['miou'])} | {fmt(metrics['fbeta'])} | | | {fmt(metrics['fdr'])} |")
    return '\n'.join(lines)


def summary(m):
    """One line with the headline numbers (in %), None shown as '-'."""
    fmt = lambda k: '-' if m.get(k) is None else f'{100 * m[k]:.2f}'
    keys = ('miou', 'fbeta', 'fdr', 'J', 'F', 'cf_miou', 'halluc_silence', 'halluc_noise', 'stereo_acc', 'stereo_swap_acc')
    return f"n={m['n']} " + ' '.join(f'{k}={fmt(k)}' for k in keys)

# -----------------------------------------------------------------------------------------------
# probes: which audio replaces the original, and which instance a stereo swap should move to


def counterfactual_class(objects):
    """The class whose audio replaces the original in the counterfactual probe (Figs. 1, 14), or None
    when the image holds fewer than 2 VPO classes: the first class (in object order) that is not
    sounding; if every class sounds (MS), the first class other than the first sounding object's."""
    present = list(dict.fromkeys(o['cls'] for o in objects))
    if len(present) < 2:
        return None
    sounding = {o['cls'] for o in objects if o['sounding']}
    silent = [c for c in present if c not in sounding]
    if silent:
        return silent[0]
    first = next(o['cls'] for o in objects if o['sounding'])
    return next(c for c in present if c != first)


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
# evaluation loop


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
                z, attn = model.fuse(v['u_v'].expand(k, -1, -1, -1), model.forward_audio(audios))  # z: (k, D, h, w)
                logits = model.classify(z, size)                                                   # (k, C, H, W)
            else:
                out = model(x.expand(k, -1, -1, -1), audios)
                logits, attn = out['logits'], out['attn']
                if tuple(logits.shape[-2:]) != size:
                    logits = F.interpolate(logits, size=size, mode='bilinear', align_corners=False)
        return logits.float(), attn
    return run


@torch.inference_mode()
def evaluate(model, dataset, device, *, amp_dtype=None, probes=True, vis=0, vis_dir=None, max_samples=None, progress=True):
    """Stream over `dataset` (batch 1, metrics at label resolution) and return a metrics dict (fractions in [0, 1]):
      miou, fbeta, fdr, per_class            semantic_scores of the summed confusion matrix (Sec. 5.1)
      J, F                                   means over images of mask_iou / f_score of binary foreground:
                                             predicted fg = argmax != 0, fg = label in 1..C-1, label 255
                                             pixels are not scored (empty-gt / all-ignore images: see there)
      cf_miou, cf_n                          counterfactual (Figs. 1, 14): images with >= 2 VPO classes get the
                                             audio of counterfactual_class() (dataset.load(i, sounding=its
                                             objects)) and are scored against its instances; dataset-level mIoU
      halluc_silence, halluc_noise           share of all pixels predicted foreground under load(i, audio=...)
      stereo_acc, stereo_swap_acc, stereo_n  VPO-MSMI, stereo only (else None), on mirror_pair() samples: with
                                             the original audio, the share whose class-c prediction covers a
                                             larger fraction of the sounding instance s than of its mirror m;
                                             with L/R swapped (load(i, swap=True)), the share where it moves:
                                             covers a larger fraction of m than of s
    vis > 0 writes PNGs of the first `vis` samples to vis_dir. Probe values are None when no sample
    qualifies or probes=False. The model's train/eval mode is restored afterwards."""
    if vis and not vis_dir:
        raise ValueError('evaluate: vis > 0 needs vis_dir')
    device = torch.device(device)
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    C, classes = dataset.num_classes, list(dataset.classes)
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    has_load = probes and hasattr(dataset, 'load') and hasattr(dataset, 'rows')
    conf, conf_cf, cf_n = torch.zeros(C, C, dtype=torch.int64), torch.zeros(C, C, dtype=torch.int64), 0
    j_sum, j_n, f_sum, f_n = 0.0, 0, 0.0, 0
    fg_px = {'silence': 0, 'noise': 0}
    total_px = 0
    stereo, stereo_n, stereo_hit, swap_hit = None, 0, 0, 0
    was_training = model.training
    model.eval()
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc='evaluate', dynamic_ncols=True)
    for i in it:
        s = dataset[i]
        x, label = s['image'][None].to(device), s['label'][None].to(device)   # (1, 3, H, W), (1, H, W)
        if stereo is None:  # decided on the first sample: the probe needs two channels (Sec. 3) and MSMI
            stereo = has_load and s['audio'].shape[0] == 2 and getattr(dataset, 'subset', None) == 'vpo_msmi'
        run = runner(model, x, amp, label.shape[-2:])
        # The probes' audio inputs (each a re-mix of this image's clips) go through the model in one batch
        # with the original: the image branch runs once, the audio branch and f_CA once per batch.
        objects = dataset.rows[i]['objects'] if has_load else []
        # re-choosing the sounding objects needs the instance map; the official release has none
        rechoose = has_load and bool(dataset.rows[i].get('inst'))
        c = counterfactual_class(objects) if rechoose else None
        pair = mirror_pair(objects) if stereo and rechoose else None
        extra = {}   # probe name -> sample dict
        if c is not None:  # Figs. 1, 14: another present class's audio; its instances are the target
            extra['cf'] = dataset.load(i, sounding=[k for k, o in enumerate(objects) if o['cls'] == c])
        if has_load:
            for kind in ('silence', 'noise'):
                extra[kind] = dataset.load(i, audio=kind)
        if pair is not None:  # Fig. 13: L and R swapped, image unchanged
            extra['swap'] = dataset.load(i, swap=True)
        logits_all, attn = run(torch.stack([s['audio']] + [e['audio'] for e in extra.values()]).to(device))
        preds = dict(zip(extra, logits_all[1:].argmax(1, keepdim=True)))   # name -> (1, H, W)
        logits, attn = logits_all[:1], attn[:1]
        pred = logits.argmax(1)                                              # (1, H, W)
        conf += confusion_matrix(pred, label, C).cpu()
        valid, gt = label != 255, (label != 0) & (label != 255)
        j = mask_iou(pred != 0, gt, valid)
        f = f_score(1 - logits.softmax(1)[:, 0], gt, valid=valid)
        j_sum, j_n = j_sum + j.nansum().item(), j_n + (~j.isnan()).sum().item()
        f_sum, f_n = f_sum + f.nansum().item(), f_n + (~f.isnan()).sum().item()
        audio_preds = [('original', pred)]
        if c is not None:
            conf_cf += confusion_matrix(preds['cf'], extra['cf']['label'][None].to(device), C).cpu()
            cf_n += 1
            audio_preds.append((c, preds['cf']))
        if has_load:
            for kind in ('silence', 'noise'):
                fg_px[kind] += (preds[kind] != 0).sum().item()
                audio_preds.append((kind, preds[kind]))
            total_px += pred.numel()
        if pair is not None:  # instance masks of s (its class in the label) and m (load with m sounding)
            k = classes.index(objects[pair[0]]['cls'])
            inst_s, inst_m = label[0] == k, dataset.load(i, sounding=[pair[1]])['label'].to(device) == k
            pred_sw = preds['swap'][0] == k
            cover = lambda p, m: (p & m).sum().item() / max(m.sum().item(), 1)
            stereo_n += 1
            stereo_hit += cover(pred[0] == k, inst_s) > cover(pred[0] == k, inst_m)
            swap_hit += cover(pred_sw, inst_m) > cover(pred_sw, inst_s)
        if i < vis:
            save_picture(os.path.join(vis_dir, f'{i:05d}.png'), s['image'], s['label'], pred[0],
                         _attn_map(attn, tuple(label.shape[-2:])), audio_preds, classes)
    model.train(was_training)
    m = semantic_scores(conf)
    m.update(classes=classes, n=n, J=j_sum / j_n if j_n else None, F=f_sum / f_n if f_n else None,
             cf_miou=semantic_scores(conf_cf)['miou'] if conf_cf.sum() else None, cf_n=cf_n,
             halluc_silence=fg_px['silence'] / total_px if total_px else None,
             halluc_noise=fg_px['noise'] / total_px if total_px else None,
             stereo_acc=stereo_hit / stereo_n if stereo_n else None,
             stereo_swap_acc=swap_hit / stereo_n if stereo_n else None, stereo_n=stereo_n)
    return m

# -----------------------------------------------------------------------------------------------
# pictures (App. C, Figs. 1, 10-14): PIL only


IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
PANEL_W, TITLE_H = 320, 14


def palette(n=256):
    """(256, 3) uint8 colours: the PASCAL VOC scheme (bits of the class index spread over R, G, B);
    0 = black background, 255 = white ignore."""
    pal = np.zeros((256, 3), np.uint8)
    for c in range(n):
        k, rgb = c, [0, 0, 0]
        for bit in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((k >> ch) & 1) << bit
            k >>= 3
        pal[c] = rgb
    pal[255] = 255
    return pal


PALETTE = palette()


def _panel(rgb, title, nearest):
    """A uint8 (H, W, 3) array -> PIL panel PANEL_W wide with a title strip on top."""
    im = Image.fromarray(rgb)
    h = max(1, round(im.height * PANEL_W / im.width))
    im = im.resize((PANEL_W, h), Image.NEAREST if nearest else Image.BILINEAR)
    out = Image.new('RGB', (PANEL_W, h + TITLE_H), (255, 255, 255))
    out.paste(im, (0, TITLE_H))
    ImageDraw.Draw(out).text((2, 1), title[:52], fill=(0, 0, 0))
    return out


def _attn_map(attn, size):
    """The fusion's attention (Sec. 4.1: sigmoid(q k^T / sqrt(d)) of each pixel query against the one audio
    token), (1, heads, h, w), as an (H, W) map for display: mean over heads, bilinear-upsampled, min-max
    scaled (the raw range goes in the panel title). Returns (map, raw min, raw max)."""
    a = attn[0].float().mean(0)                                          # heads, h, w -> h, w
    a = F.interpolate(a[None, None], size=size, mode='bilinear', align_corners=False)[0, 0]   # H, W
    lo, hi = a.min().item(), a.max().item()
    return (a - lo) / max(hi - lo, 1e-12), lo, hi


def save_picture(path, image, label, pred, attn_map, audio_preds, classes):
    """One PNG per sample: image | ground truth | prediction | attention map (_attn_map's triple or
    None), and below, when the probes ran, the prediction under each audio: [(name, (1, H, W) pred)]
    for the original, the counterfactual class, silence and noise."""
    img = image.float().cpu().permute(1, 2, 0).numpy() * IMAGENET_STD + IMAGENET_MEAN    # H, W, 3
    names = lambda m: ', '.join(classes[k] for k in m.unique().tolist() if 0 < k < len(classes)) or 'none'
    gt, pr = label.cpu(), pred.cpu()
    row = [_panel((img.clip(0, 1) * 255).astype(np.uint8), 'image', False),
           _panel(PALETTE[gt.numpy()], f'GT: {names(gt)}', True),
           _panel(PALETTE[pr.numpy()], f'pred: {names(pr)}', True)]
    if attn_map is not None:
        a, lo, hi = attn_map
        v = a.cpu().numpy()
        heat = np.stack([v * 3, v * 3 - 1, v * 3 - 2], -1).clip(0, 1)   # black-red-yellow-white
        row.append(_panel((heat * 255).astype(np.uint8), f'attn [{lo:.2f}, {hi:.2f}]', False))
    rows = [row]
    if len(audio_preds) > 1:
        rows.append([_panel(PALETTE[p[0].cpu().numpy()], f'audio {a}: {names(p[0].cpu())}', True) for a, p in audio_preds])
    W = PANEL_W * max(len(r) for r in rows)
    H = sum(r[0].height for r in rows)
    canvas = Image.new('RGB', (W, H), (255, 255, 255))
    y = 0
    for r in rows:
        for k, p in enumerate(r):
            canvas.paste(p, (k * PANEL_W, y))
        y += r[0].height
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    canvas.save(path)

# -----------------------------------------------------------------------------------------------
# checkpoint (SPEC.md Addendum) and CLI

CKPT_KEYS = ('data', 'num_classes', 'mono', 'backbone', 'output_stride', 'attn', 'heads')
CKPT_OPTIONAL = ('dim', 'audio_backbone')  # passed when saved, else CAVP's defaults


def load_checkpoint(path, device, *, data=None, num_classes=None, mono=None):
    """(model in eval mode on device, args dict) from a train.py checkpoint, CAVP rebuilt from
    ckpt['args'] and loaded strictly (official-code bug 7: no silent strict=False). data / num_classes /
    mono, when given, must match what the checkpoint was trained with; errors name what differs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--ckpt {path}: no such file')
    # weights_only=False: our checkpoints also hold numpy RNG state; load only checkpoints you trust
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'args' not in ckpt:
        raise ValueError(f"--ckpt {path}: not a train.py checkpoint (needs 'model' and 'args')")
    args = ckpt['args']
    missing = [k for k in CKPT_KEYS if k not in args]
    if missing:
        raise KeyError(f'--ckpt {path}: args lack {missing}')
    if mono is not None and args['mono'] != mono:  # Fig. 7 / Table 8: say which flag fixes it
        raise ValueError(f"--ckpt {path} is a {'mono' if args['mono'] else 'stereo'} checkpoint (mono={args['mono']}): "
                         f"{'pass' if args['mono'] else 'drop'} --mono")
    for key, flag, want in (('data', '--data', data), ('num_classes', 'class count', num_classes)):
        if want is not None and args[key] != want:
            raise ValueError(f'--ckpt {path} was trained with {key}={args[key]!r}, but {flag} asks for {want!r}')
    from model import CAVP  # imported here: the metric functions above need no model code
    model = CAVP(num_classes=args['num_classes'], backbone=args['backbone'], output_stride=args['output_stride'],
                 audio_channels=1 if args['mono'] else 2, attn=args['attn'], heads=args['heads'],
                 **{k: args[k] for k in CKPT_OPTIONAL if args.get(k) is not None})
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        raise RuntimeError(f'--ckpt {path}: its weights do not fit the CAVP rebuilt from its args: {e}') from None
    return model.to(device).eval(), args


def main():
    p = argparse.ArgumentParser(description='Evaluate a CAVP checkpoint: dataset-level mIoU / F_beta / FDR, '
                                'per-image J / F, audio probes, pictures (Sec. 5.1, App. C).')
    # what to evaluate
    p.add_argument('--ckpt', default=None, help='checkpoint written by train.py, e.g. runs/<name>/best.pt (required)')
    p.add_argument('--data', default=None, choices=['vpo_ss', 'vpo_ms', 'vpo_msmi', 's4', 'ms3', 'avss'],
                   help="dataset; must match the checkpoint's (default: the checkpoint's)")
    p.add_argument('--root', default=None, help="dataset root (default: the checkpoint's --root)")
    p.add_argument('--split', default='test', choices=['test', 'val'], help='split to evaluate')
    p.add_argument('--avss-subsets', nargs='+', default=None, choices=['v1s', 'v1m', 'v2'], help='AVSS only: evaluate these subsets (Table 3 columns)')
    p.add_argument('--test-scale', type=float, default=None,
                   help="VPO: resize images by this factor before the network (metrics stay at original resolution); default the checkpoint's")
    p.add_argument('--mono', action='store_true',
                   help='evaluate a mono checkpoint (Fig. 7 / Table 8); must match how the checkpoint was trained')
    # probes and outputs
    p.add_argument('--no-probes', action='store_true', help='skip the counterfactual / hallucination / stereo probes')
    p.add_argument('--vis', type=int, default=0, help='write PNGs for the first N samples')
    p.add_argument('--max-samples', type=int, default=None, help='evaluate only the first N samples (smoke tests)')
    p.add_argument('--out', default=None, help='output folder (default: <ckpt folder>/eval_<data>_<split>)')
    # system
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    p.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'], help='autocast dtype for inference')
    a = p.parse_args()
    if a.ckpt is None:
        p.error('--ckpt is required')
    import data  # imported here: the metric functions above need no dataset code
    try:
        model, cargs = load_checkpoint(a.ckpt, a.device, data=a.data, mono=a.mono)
    except (FileNotFoundError, ValueError, KeyError) as e:
        p.error(str(e))
    ds = data.build_dataset(cargs['data'], a.root or cargs['root'], a.split, train=False,
                            audio_seconds=cargs['audio_seconds'], mono=cargs['mono'], resize=cargs.get('resize'), subsets=a.avss_subsets,
                            test_scale=a.test_scale or cargs.get('test_scale') or 1.0)
    if ds.num_classes != cargs['num_classes']:
        raise ValueError(f"--ckpt {a.ckpt} has {cargs['num_classes']} classes, the {cargs['data']} "
                         f'dataset {ds.num_classes}')
    out = a.out or os.path.join(os.path.dirname(a.ckpt), f"eval_{cargs['data']}_{a.split}")
    os.makedirs(out, exist_ok=True)
    amp = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[a.amp]
    m = evaluate(model, ds, a.device, amp_dtype=amp, probes=not a.no_probes, vis=a.vis,
                 vis_dir=os.path.join(out, 'vis'), max_samples=a.max_samples)
    m.update(ckpt=a.ckpt, data=cargs['data'], split=a.split, mono=cargs['mono'], test_scale=getattr(ds, 'test_scale', 1.0))
    table = format_table(m, ds.classes)
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
        json.dump(m, f, indent=1)
    with open(os.path.join(out, 'per_class.md'), 'w') as f:
        f.write(f"{cargs['data']} {a.split}, {a.ckpt} (in %)\n\n{table}\n")
    print(table)
    print(summary(m))
    print(f'wrote {out}/metrics.json, per_class.md' + (f', vis/ ({a.vis} PNGs)' if a.vis else ''))


if __name__ == '__main__':
    main()
