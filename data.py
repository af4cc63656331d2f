"""Data: every source of the paper's experiments, read into torch Datasets (Sec. 3, Sec. 4, App. B.1).

Read in this order: constants; the audio front-ends (read_clip, logmel of the VPO models, the VGGish
front-end of AVSBench); VPODataset with its joint image/mask/audio transforms; the AVSBench loaders
(Tables 1-3); resolve_root / build_dataset, which pick the source --data / --root name; then the built-in
offline generator, which is not part of the paper; the CLI last.

Every VPO source ends up as a VPO manifest (vpo.py's layout) and goes through the same VPODataset:
    real:      python vpo.py --coco ... --audio ... --out DIR; then --root DIR           -> VPODataset
    official:  --root <folder holding VPO-SS/ VPO-MS/ VPO-MSMI/>  -> vpo.read_official() -> VPODataset
    built-in:  no --root: data/ (VPO-SS), data/vpo_ms/, data/vpo_msmi/ <- COCO 2017 + VGGSound-format files
               drawn for that subset (ensure_builtin) -> vpo.build() -> VPODataset
AVSBench (--data s4 | ms3 | avss, --root the released folder) -> AVSBenchDataset.

    python data.py --data vpo_msmi [--root DIR]    # summary + preview PNG (image, mask, stereo log-mel)
"""
import argparse
import csv
import fcntl
import functools
import json
import math
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio
from PIL import Image, ImageDraw, ImageEnhance

import vpo

SR = 16000                                           # App. B.1: audio at 16 kHz
MEAN = np.array([0.485, 0.456, 0.406], np.float32)   # ImageNet statistics (torchvision backbones)
STD = np.array([0.229, 0.224, 0.225], np.float32)
VPO_SUBSETS = ('vpo_ss', 'vpo_ms', 'vpo_msmi')
AVSBENCH = ('s4', 'ms3', 'avss')
OFFICIAL_DIRS = ('VPO-SS', 'VPO-MS', 'VPO-MSMI')     # folders of the official VPO release
HERE = os.path.dirname(os.path.abspath(__file__))


def palette(n=256):
    """(n, 3) uint8: the PASCAL VOC colour map, in which bits 3k, 3k+1, 3k+2 of the class index set bit
    7-k of R, G and B. AVSBench's colour masks (labels_rgb) use its first 71 entries; entry 255 is VOC's
    colour of ignored pixels (224, 224, 192)."""
    pal = np.zeros((n, 3), np.uint8)
    for j in range(n):
        lab, k = j, 0
        while lab:
            for c in range(3):
                pal[j, c] |= ((lab >> c) & 1) << (7 - k)
            lab, k = lab >> 3, k + 1
    return pal


# -----------------------------------------------------------------------------------------------
# reading inputs: manifests named when damaged, id masks by value (vpo.read_json, vpo.inside, vpo.id_array)

def _read_jsonl(path):
    """The rows of a JSON-lines manifest (blank lines skipped); a bad line raises ValueError naming file:line."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}:{n}: not a JSON line ({e.msg}, column {e.colno})') from e
    return rows


def _open(path, what, where):
    try:
        im = Image.open(path)
        im.load()
        return im
    except Exception as e:   # PIL raises several types; the file name is what a user needs
        raise RuntimeError(f'cannot read {what} {path} (from {where}): {e}') from e


def read_id_mask(path, what='mask', where=None):
    """Mode-L PIL image of the ids stored in an id PNG, whatever its mode (vpo.id_array)."""
    return Image.fromarray(vpo.id_array(_open(path, what, where), path, what, where))


# -----------------------------------------------------------------------------------------------
# audio front-ends: reading any clip, the log-mel of the VPO models, the VGGish examples of AVSBench

_RESAMPLE = {}


def read_clip(path, seconds, rng=None, *, mono=True):
    """A float32 window of `seconds` at 16 kHz from any wav/flac/ogg/opus file of any rate and channel count:
    (L,) averaged to mono, or (channels, L) as recorded with mono=False. Training takes a random window (rng),
    evaluation the centre one (the official code's centre crop); clips shorter than the window are tiled whole
    (the official crop starts at a negative index for clips under 3 s and tiles only their last part). VPO
    averages to mono: it re-pans every source by its object's position (vpo.pan), so a file's own stereo is not
    kept."""
    try:
        with sf.SoundFile(path) as f:   # opened once: header, seek and read
            n, sr = f.frames, f.samplerate
            need = int(math.ceil(seconds * sr))
            start = 0
            if n > need:
                start = int(rng.integers(0, n - need + 1)) if rng is not None else (n - need) // 2
                f.seek(start)
            x = f.read(min(need, n) if n > 0 else -1, dtype='float32', always_2d=True)   # n, channels
    except Exception as e:  # soundfile raises several types; the file name is what a user needs
        raise RuntimeError(f'cannot read audio clip {path}: {e}') from e
    x = np.ascontiguousarray((x.mean(1, keepdims=True) if mono else x).T)                  # channels, n
    if sr != SR and x.shape[1]:
        if sr not in _RESAMPLE:   # the sinc kernel is built once per rate
            _RESAMPLE[sr] = torchaudio.transforms.Resample(sr, SR)
        x = _RESAMPLE[sr](torch.from_numpy(x)).numpy()
    L = int(round(seconds * SR))
    if x.shape[1] == 0:
        x = np.zeros((x.shape[0], L), np.float32)
    x = np.tile(x, (1, -(-L // x.shape[1])))[:, :L].astype(np.float32)                    # channels, L
    return x[0] if mono else x


_MEL = {}


def logmel(wave):
    """(..., L) 16 kHz waveform -> (..., T, 64) log-mel, T = 100 frames per second (App. B.1; the
    official parameters: n_fft 512, window 400, hop 160, 125-3800 Hz, power 2,
    20 * log10(max(p, 1e-5)) / 100, first T frames). Works on CPU or GPU tensors, batched."""
    key = str(wave.device)
    if key not in _MEL:
        _MEL[key] = torchaudio.transforms.MelSpectrogram(
            SR, n_fft=512, win_length=400, hop_length=160, f_min=125, f_max=3800, n_mels=64, power=2.0
        ).to(wave.device)
    T = wave.shape[-1] // 160
    p = _MEL[key](wave.float())                                  # (..., 64, T + 1)
    return (20 * torch.log10(p.clamp_min(1e-5)) / 100)[..., :T].transpose(-1, -2).contiguous()  # (..., T, 64)


# VGGish front-end (AVSBench, App. B.1 following [63]): 96 x 64 log-mel examples of 0.96 s
WIN, HOP, N_FFT = 400, 160, 512   # 25 ms window, 10 ms hop, FFT = next power of two above the window
N_MELS, F_MIN, F_MAX = 64, 125.0, 7500.0
LOG_OFFSET = 0.01                 # log(mel + 0.01): the VGGish offset, not the VPO 20*log10 form
PATCH = 96                        # frames per example: 0.96 s
EXAMPLE_SAMPLES = (PATCH - 1) * HOP + WIN   # 15600 samples (0.975 s) give exactly one 96-frame example
EXAMPLE_HOP = PATCH * HOP         # 15360 samples: examples are back to back, 0.96 s apart


def _hz_to_mel(f):
    return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)   # HTK formula, as VGGish


@functools.lru_cache(maxsize=1)
def _mel_matrix():
    """(257, 64) float64 triangles that are linear in *mel* (torchaudio's HTK fbanks are linear in Hz,
    so they differ slightly); the DC bin gets no weight, as in HTK/VGGish; no area normalisation."""
    bins_mel = _hz_to_mel(torch.linspace(0.0, SR / 2, N_FFT // 2 + 1, dtype=torch.float64))
    edges = torch.linspace(_hz_to_mel(F_MIN).item(), _hz_to_mel(F_MAX).item(), N_MELS + 2,
                           dtype=torch.float64)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]                      # (64,) each
    up = (bins_mel[:, None] - lo) / (mid - lo)                            # (257, 64)
    down = (hi - bins_mel[:, None]) / (hi - mid)                          # (257, 64)
    w = torch.clamp(torch.minimum(up, down), min=0.0)
    w[0] = 0.0
    return w


def vggish_logmel(wave):
    """VGGish examples of mono 16 kHz waveforms.

    wave: (..., L) float in [-1, 1] (numpy or tensor), L >= 15600. Returns float32 (..., n_patches,
    96, 64), so (n_patches, 96, 64) for one (L,) waveform, with n_patches = floor(n_frames / 96) and
    n_frames = 1 + (L - 400) // 160 (no centre padding, incomplete trailing examples dropped, as
    VGGish). Example k covers samples [15360 k, 15360 k + 15600), so cutting a waveform there and
    calling this gives the same patch as the whole-clip call.
    """
    w = torch.as_tensor(wave).double()
    if w.dim() == 0 or w.shape[-1] < EXAMPLE_SAMPLES:
        raise ValueError(f'vggish_logmel wants (..., L) mono waveforms with L >= {EXAMPLE_SAMPLES}, '
                         f'got shape {tuple(w.shape)}')
    # frames are cut by hand, not by torch.stft: stft centres a 400-sample window inside the 512 FFT
    # frame, which shifts every frame by 56 samples against VGGish's frame-then-zero-pad
    frames = w.unfold(-1, WIN, HOP)                                       # ..., n_frames, 400
    window = torch.hann_window(WIN, periodic=True, dtype=torch.float64, device=w.device)
    mag = torch.fft.rfft(frames * window, n=N_FFT).abs()                  # ..., n_frames, 257: magnitude, not power
    logmel = torch.log(mag @ _mel_matrix().to(w.device) + LOG_OFFSET)     # ..., n_frames, 64
    n = logmel.shape[-2] // PATCH
    return logmel[..., :n * PATCH, :].reshape(*logmel.shape[:-2], n, PATCH, N_MELS).float()  # ..., n, 96, 64


def vggish_audio(wave):
    """(..., A, 15600) waveform -> (..., A, 96, 64): one VGGish example per plane (AVSBench `audio`)."""
    return vggish_logmel(wave)[..., 0, :, :]


# -----------------------------------------------------------------------------------------------
# the VPO Dataset: one code path for every VPO source, with the joint transforms of App. B.1

class VPODataset(torch.utils.data.Dataset):
    """VPO-SS / MS / MSMI samples (Sec. 3, Sec. 4): image x, log-mel a, label y (0 background,
    1..21, 255 ignore) and the multi-hot audio label t. Audio is mixed at load time from each sounding
    object's clip panned by its alpha (Fig. 3), so a flip mirrors the sound as well (alpha -> 1 - alpha,
    in every subset: the official code forgets it in VPO-SS) and probes can re-mix any objects.

    Train (App. B.1): colour jitter, random scale 0.5-2.0, random crop (pad: image mean, mask 255),
    horizontal flip, random audio window. Test: the image at test_scale x its size (1 = original, the
    paper), the label always at original resolution (metrics are computed there), centre audio window.
    Randomness is a pure function of (seed, epoch, index): index the dataset with (epoch, i) to get
    the same batch whatever the worker count, and after a resume.

    Rows come from `{root}/{subset}/{split}.jsonl`, or are given (`rows`, e.g. vpo.read_official's, whose
    paths are absolute). A manifest's mask and instance-map names must stay inside root; its image and clip
    names are relative to root but point into the COCO and audio folders vpo.py read, which may lie anywhere."""

    def __init__(self, root, subset, split, *, train=False, crop=512, scale=(0.5, 2.0), audio_seconds=3.0,
                 mono=False, seed=0, rows=None, test_scale=1.0):
        if not 0 < test_scale <= 4:
            raise ValueError(f'test_scale={test_scale}: expected a factor in (0, 4]')
        self.root, self.subset, self.split, self.scale, self.test_scale = root, subset, split, tuple(scale), test_scale
        self.train, self.crop, self.seconds, self.mono, self.seed = train, crop, audio_seconds, mono, seed
        self.classes, self.num_classes = list(vpo.VPO_CLASSES), len(vpo.VPO_CLASSES)
        self.audio_transform = logmel   # waveform -> model input, for audio rebuilt in the loop (memory bank)
        self.manifest = os.path.join(root, subset, f'{split}.jsonl')
        if rows is None:
            if not os.path.exists(self.manifest):
                raise FileNotFoundError(f'no manifest {self.manifest}: is --root a VPO folder written by vpo.py?')
            rows = _read_jsonl(self.manifest)
            for n, row in enumerate(rows):
                for key in ('mask', 'inst'):
                    if row.get(key):
                        vpo.inside(root, row[key], source=f'{self.manifest}:{n + 1}')
        self.rows = rows
        meta = os.path.join(root, 'meta.json')
        self.itd = vpo.read_json(meta).get('itd', False) if os.path.exists(meta) else False
        self.index = {c: i for i, c in enumerate(self.classes)}
        for n, row in enumerate(rows):
            for k, o in enumerate(row['objects']):
                if o['cls'] not in self.index:
                    raise ValueError(f'{self.manifest}:{n + 1}: unknown class {o["cls"]!r}; known: {self.classes[1:]}')
                if o['sounding'] and (not o.get('clip') or o.get('alpha') is None):   # found now, not mid-epoch
                    raise ValueError(f'{self.manifest}:{n + 1}: object {k} ({o["cls"]}) sounds but has no '
                                     f'{"clip" if not o.get("clip") else "alpha"}')

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, i] if self.train else [self.seed, i])
        return self.load(i, rng=rng, augment=self.train)

    def _path(self, p):
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def load(self, i, *, sounding=None, audio=None, swap=False, flip=False, rng=None, augment=False):
        """Sample i; for probes, `sounding` re-chooses which objects sound (label and audio rebuilt from
        the instance map and their clips), `audio` = 'silence' | 'noise' replaces the sound (no clip is
        read, so an object without one, `clip: null` where its class had no audio, may sound then), `swap`
        exchanges L and R without flipping the image, `flip` mirrors image, mask and sound together."""
        if audio not in (None, 'silence', 'noise'):
            raise ValueError(f"load: audio={audio!r}; expected None, 'silence' or 'noise'")
        row, where = self.rows[i], f'{self.manifest}:{i + 1}'
        rng = rng if rng is not None else np.random.default_rng([self.seed, i])
        image = _open(self._path(row['image']), 'image', where).convert('RGB')
        objects = row['objects']
        if sounding is None:
            sounding = [k for k, o in enumerate(objects) if o['sounding']]
            label = read_id_mask(self._path(row['mask']), 'mask', where)
        else:  # rebuild the label map from the instance map: k -> class of objects[k - 1] if it sounds
            if not row.get('inst'):
                raise ValueError(f'{where}: no instance map, so the sounding objects cannot be re-chosen')
            lut = np.zeros(256, np.uint8)
            lut[255] = 255
            for k in sounding:
                lut[k + 1] = self.index[objects[k]['cls']]
            label = Image.fromarray(lut[np.asarray(read_id_mask(self._path(row['inst']), 'instance map', where))])
        if label.size != image.size:
            raise ValueError(f'{where}: mask {label.size} and image {image.size} differ in size')
        if augment:
            image, label, flip = joint_augment(image, label, crop=self.crop, rng=rng, scale=self.scale)
        elif flip:
            image, label = image.transpose(Image.FLIP_LEFT_RIGHT), label.transpose(Image.FLIP_LEFT_RIGHT)
        if not augment:   # the network sees a rescaled image; the label keeps its size
            image = rescale(image, self.test_scale)
        y = np.asarray(label, np.int64)

        # audio: each sounding object's clip panned by its (possibly mirrored) alpha, then mixed (Fig. 3)
        L = int(round(self.seconds * SR))
        waves, alphas = [], []
        for k in sounding if audio is None else ():
            o = objects[k]
            if not o.get('clip'):
                raise ValueError(f'{where}: object {k} ({o["cls"]}) has no clip (vpo.py found no audio for its '
                                 f'class), so it cannot sound')
            waves.append(read_clip(self._path(o['clip']), self.seconds, rng if augment else None))
            alphas.append(1 - o['alpha'] if flip else o['alpha'])
        if audio == 'silence' or not waves:
            stereo = np.zeros((2, L), np.float32)
        elif audio == 'noise':
            stereo = np.random.default_rng([self.seed, i, 7]).normal(0, 0.1, (2, L)).astype(np.float32)
        else:
            stereo = vpo.mix([vpo.pan(w, a, sr=SR, itd=self.itd) for w, a in zip(waves, alphas)]).astype(np.float32)
        if swap:
            stereo = stereo[::-1]
        wave = torch.from_numpy(np.ascontiguousarray(stereo))
        if self.mono:  # Fig. 7 / Table 8: one plane; L + R undoes the panning
            wave = wave.sum(0, keepdim=True)
        t = torch.zeros(self.num_classes)
        for k in sounding:
            t[self.index[objects[k]['cls']]] = 1
        # a memory-bank candidate (App. B.1): the clip of a single-source sample, mono, with its class and alpha. As
        # official (source_count == 1), a mixture gives none: it neither fills the bank nor has its audio swapped
        # (one bank clip would stand for a mixture's several sources, or sound at one of two sounding instances)
        single = len(waves) == 1
        return {
            'image': normalise(image),                                        # (3, H, W)
            'audio': logmel(wave),                                            # (A, T, 64)
            'wave': wave,                                                     # (A, L)
            'label': torch.from_numpy(y),                                     # (H, W)
            't': t,                                                           # (C,)
            'index': i,
            'bank_wave': torch.from_numpy(waves[0]) if single else torch.zeros(L),
            'bank_cls': self.index[objects[sounding[0]]['cls']] if single else 0,
            'bank_alpha': float(alphas[0]) if single else 0.5,
        }


def joint_augment(image, label, *, crop, rng, scale=(0.5, 2.0), jitter=0.4):
    """App. B.1 train transforms, shared by every dataset: colour jitter, random scale 0.5-2.0 + random
    crop in one resample (PIL's resize box reads only the crop's source region), pad the image with its
    mean colour and the mask with 255, horizontal flip. PIL image + PIL label in, (image, label, flip) out."""
    for op in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = op(image).enhance(rng.uniform(1 - jitter, 1 + jitter))
    W, H = image.size
    s = rng.uniform(*scale)
    sw, sh = max(1, round(W * s)), max(1, round(H * s))                    # scaled size
    cw, ch = min(crop, sw), min(crop, sh)                                  # the part of it kept
    x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    box = (x0 / s, y0 / s, min(W, (x0 + cw) / s), min(H, (y0 + ch) / s))   # that part in source pixels
    px, py = int(rng.integers(0, crop - cw + 1)), int(rng.integers(0, crop - ch + 1))
    img = Image.new('RGB', (crop, crop), tuple(int(v * 255) for v in MEAN))
    img.paste(image.resize((cw, ch), Image.BILINEAR, box=box), (px, py))
    lab = Image.new('L', (crop, crop), 255)
    lab.paste(label.resize((cw, ch), Image.NEAREST, box=box), (px, py))
    flip = bool(rng.random() < 0.5)
    if flip:
        img, lab = img.transpose(Image.FLIP_LEFT_RIGHT), lab.transpose(Image.FLIP_LEFT_RIGHT)
    return img, lab, flip


_MEAN_T, _STD_T = torch.from_numpy(MEAN)[:, None, None], torch.from_numpy(STD)[:, None, None]


def rescale(image, factor):
    """PIL image resized by `factor` (bilinear), as evaluation images are under --test-scale; 1 returns it as is."""
    if factor == 1:
        return image
    return image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BILINEAR)


def normalise(image):
    """PIL RGB -> (3, H, W) float32, ImageNet-normalised ((x / 255 - mean) / std, in place on one buffer)."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().float()   # 3, H, W
    return x.div_(255).sub_(_MEAN_T).div_(_STD_T)


# -----------------------------------------------------------------------------------------------
# AVSBench (Tables 1-3): the paper's other benchmarks, in their released layouts

BINARY_CLASSES = ['background', 'foreground']
# v1s / v1m are the 5 s AVSBench-Object clips (5 frames), v2 the new 10 s clips (10 frames). The
# official AVSS loader zero-pads v1 clips to 10 frames (black images, all-background labels) and its
# test counts those padded frames in the metrics; here a sample is a real frame, so there is no padding.
AVSS_FRAMES = {'v1s': 5, 'v1m': 5, 'v2': 10}


def _read_csv(path, columns):
    """(header, [(line number, row dict)]) of a metadata CSV that must have `columns`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} is missing (is --root the folder that holds it?)')
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        rows = [(reader.line_num, r) for r in reader]
    lacking = [c for c in columns if c not in (reader.fieldnames or [])]
    if lacking:
        raise ValueError(f'{path} lacks column(s) {lacking}; header is {reader.fieldnames}')
    return reader.fieldnames, rows


def _need(path, where):
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} is missing ({where})')


def _s4_rows(root, split):
    path = os.path.join(root, 's4_meta_data.csv')
    fields, rows = _read_csv(path, ['category', 'split'])
    out = []
    for line, r in rows:
        if r['split'] != split:
            continue
        # the video name is read by position, as the official loaders do (header 'name' in the release)
        name, cat = r[fields[0]], r['category']
        where = f'{path} line {line}, video {name}'
        frames = vpo.inside(os.path.join(root, 's4_data', 'visual_frames', split), cat, name, source=where)
        masks = vpo.inside(os.path.join(root, 's4_data', 'gt_masks', split), cat, name, source=where)
        wav = vpo.inside(os.path.join(root, 's4_data', 'audio_wav', split), cat, name + '.wav', source=where)
        for p in (frames, masks, wav):
            _need(p, where)
        # S4 train annotates only the first of the 5 frames ([63]); the others have no label, so
        # they are not samples. val / test annotate all 5.
        for i in ([1] if split == 'train' else range(1, 6)):
            out.append(dict(video=name, subset='s4', category=cat, frame=i, segment=i - 1, where=where,
                            image=os.path.join(frames, f'{name}_{i}.png'),
                            mask=os.path.join(masks, f'{name}_{i}.png'), audio=wav))
    return out


def _ms3_rows(root, split):
    path = os.path.join(root, 'ms3_meta_data.csv')
    fields, rows = _read_csv(path, ['split'])
    out = []
    for line, r in rows:
        if r['split'] != split:
            continue
        name = r[fields[0]]
        where = f'{path} line {line}, video {name}'
        frames = vpo.inside(os.path.join(root, 'ms3_data', 'visual_frames'), name, source=where)
        masks = vpo.inside(os.path.join(root, 'ms3_data', 'gt_masks', split), name, source=where)
        wav = vpo.inside(os.path.join(root, 'ms3_data', 'audio_wav', split), name + '.wav', source=where)
        for p in (frames, masks, wav):
            _need(p, where)
        for i in range(1, 6):   # every MS3 frame is annotated, train included
            out.append(dict(video=name, subset='ms3', category=None, frame=i, segment=i - 1, where=where,
                            image=os.path.join(frames, f'{name}.mp4_{i}.png'),
                            mask=os.path.join(masks, f'{name}_{i}.png'), audio=wav))
    return out


def _avss_classes(root):
    """Class names in index order from label2idx.json. Only the order of the names matters (mask value k is
    the k-th class, coloured by palette entry k, as in the official loader); copies number the classes
    0..70 (the release) or 1..71 (copies published with follow-up work), background first in both."""
    path = os.path.join(root, 'label2idx.json')
    _need(path, 'AVSS class list')
    idx = vpo.read_json(path)
    if not isinstance(idx, dict) or not idx or not all(type(v) is int for v in idx.values()):
        raise ValueError(f'{path}: expected a JSON object of class name -> integer index')
    names = sorted(idx, key=idx.get)
    first = idx[names[0]]
    if first not in (0, 1) or [idx[n] for n in names] != list(range(first, first + len(names))) \
            or names[0] != 'background':
        raise ValueError(f'{path}: indices must be 0..{len(names) - 1} with background = 0, '
                         f'or 1..{len(names)} with background = 1')
    return names


def _avss_rows(root, split, subsets):
    path = os.path.join(root, 'metadata.csv')
    _, rows = _read_csv(path, ['uid', 'label', 'split'])
    out = []
    for line, r in rows:
        if r['split'] != split or r['label'] not in subsets:
            continue
        uid, sub = r['uid'], r['label']
        where = f'{path} line {line}, uid {uid}'
        base = vpo.inside(os.path.join(root, sub), uid, source=where)
        for p in (os.path.join(base, 'frames'), os.path.join(base, 'labels_semantic'),
                  os.path.join(base, 'audio.wav')):
            _need(p, where)
        # v1s keeps the S4 protocol: in train only frame 0 is annotated (official gt flag 1,0,0,0,0)
        frames = [0] if (sub == 'v1s' and split == 'train') else range(AVSS_FRAMES[sub])
        for i in frames:
            out.append(dict(video=uid, subset=sub, category=r.get('a_obj'), frame=i, segment=i, where=where,
                            image=os.path.join(base, 'frames', f'{i}.jpg'),
                            mask=os.path.join(base, 'labels_semantic', f'{i}.png'),
                            audio=os.path.join(base, 'audio.wav')))
    return out


def _open_frame_file(path, row):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} is missing ({row["where"]}, frame {row["frame"]})')
    return Image.open(path)


def binary_label(img):
    """uint8 (H, W) 0/1 from an S4/MS3 mask. Grey masks (0/255) are thresholded at 128, which is
    what the official `convert('1')` gives on clean masks (without its dithering of mid greys);
    palette or 0/1 masks count every non-zero index as foreground."""
    if img.mode in ('P', '1'):
        return (np.asarray(img) > 0).astype(np.uint8)
    grey = np.asarray(img.convert('L'))
    return (grey >= 128 if grey.max() > 1 else grey > 0).astype(np.uint8)


def semantic_label(img, colours, path):
    """uint8 (H, W) class indices from an AVSS mask: labels_semantic PNGs store the index (mode P or
    L, 255 = ignore); an RGB colour mask (labels_rgb) is decoded with `colours` (N, 3), the class colours
    (palette(N)); colours not in it (anti-aliasing) become 255."""
    if img.mode in ('P', 'L'):
        a = np.array(img, dtype=np.uint8)
    elif img.mode in ('RGB', 'RGBA'):
        rgb = np.asarray(img.convert('RGB')).astype(np.int64)
        key = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]                       # H, W
        pal = colours.astype(np.int64)
        pal_key = pal[:, 0] << 16 | pal[:, 1] << 8 | pal[:, 2]                         # N (VOC colours are distinct)
        order = np.argsort(pal_key)
        pos = np.clip(np.searchsorted(pal_key[order], key), 0, len(order) - 1)         # H, W
        a = np.where(pal_key[order][pos] == key, order[pos], 255).astype(np.uint8)
    else:
        raise ValueError(f'{path}: mask mode {img.mode} is neither an index PNG (P/L) nor RGB')
    bad = (a >= len(colours)) & (a != 255)
    if bad.any():
        raise ValueError(f'{path}: values {np.unique(a[bad])[:5].tolist()} are not classes '
                         f'0..{len(colours) - 1} of label2idx.json (or 255)')
    return a


def audio_segment(path, k, row):
    """(15600,) float32: samples [15360 k, 15360 k + 15600) of the 16 kHz mono audio, i.e. VGGish
    example k, the one the official precomputed log-mels give frame k + 1 (its 0.96 s "second").
    Too short for example k: the last complete example (the official S4/MS3 preprocessing repeats
    the last example); shorter than one example: zero-padded."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} is missing ({row["where"]})')
    info = sf.info(path)
    if info.frames == 0:
        raise ValueError(f'{path} is empty ({row["where"]})')
    if info.samplerate == SR:
        n = info.frames
        k = max(0, min(k, (n - EXAMPLE_SAMPLES) // EXAMPLE_HOP))
        w, _ = sf.read(path, start=k * EXAMPLE_HOP, stop=k * EXAMPLE_HOP + EXAMPLE_SAMPLES,
                       dtype='float32', always_2d=True)                                # L, C
        w = torch.from_numpy(w).mean(1)                                                # L: VGGish averages channels
    else:
        # official: resampy over the whole file; torchaudio's sinc resampler differs slightly
        w, sr = sf.read(path, dtype='float32', always_2d=True)
        w = torchaudio.functional.resample(torch.from_numpy(w).mean(1), sr, SR)
        k = max(0, min(k, (len(w) - EXAMPLE_SAMPLES) // EXAMPLE_HOP))
        w = w[k * EXAMPLE_HOP:k * EXAMPLE_HOP + EXAMPLE_SAMPLES]
    return F.pad(w, (0, EXAMPLE_SAMPLES - len(w)))


class AVSBenchDataset(torch.utils.data.Dataset):
    """One sample per annotated frame of AVSBench `name` (s4 | ms3 | avss), `split` (train | val | test).

    Returns the VPODataset dict: image (3, H, W) ImageNet-normalised; audio (1, 96, 64) VGGish
    log-mel of the frame's second (A = 1: AVSBench is mono); wave (1, 15600) that waveform; label
    (H, W) int64 (S4/MS3 0/1, AVSS 0..70, 255 ignore / pad); t (num_classes,) multi-hot of the classes
    in the frame's mask, taken as the classes heard (AVSBench masks only sounding objects; t[0] = 0);
    index. Memory bank (App. B.1): a frame with exactly one class in t is a single-source candidate,
    bank_wave = its waveform (15600,), bank_cls = that class; otherwise bank_wave = zeros and
    bank_cls = 0, which MemoryBank.push and bank_swap skip (the VPO convention for "no candidate").
    bank_alpha = 0.5: mono audio has no position. On binary S4 / MS3 every sounding frame is class 1,
    so the bank does nothing useful there.

    resize: 224 for the resized protocol (Tables 1-2), None for original resolution (Table 3).
    crop: train crop side; None -> `resize` if given, else 512 (App. B.1). subsets: AVSS only, a
    subset of (v1s, v1m, v2) for the per-subset columns of Table 3. As VPODataset, augmentation is a
    pure function of (seed, epoch, index): index with (epoch, i) (train.EpochSampler) or with i (epoch 0).
    No `load()`: the audio probes need instance maps and stereo, so evaluate.py skips them here.
    """

    def __init__(self, root, name, split, *, train=False, crop=None, scale=(0.5, 2.0), resize=None, subsets=None,
                 seed=0):
        if name not in AVSBENCH:
            raise ValueError(f'--data {name!r}: AVSBench name must be one of {AVSBENCH}')
        if split not in ('train', 'val', 'test'):
            raise ValueError(f'split {split!r} must be train, val or test')
        if subsets is not None and name != 'avss':
            raise ValueError(f'subsets={subsets} only applies to avss, not {name}')
        subsets = tuple(subsets or AVSS_FRAMES)
        if not set(subsets) <= set(AVSS_FRAMES):
            raise ValueError(f'subsets={subsets}: AVSS subsets are {tuple(AVSS_FRAMES)}')
        if not os.path.isdir(root):
            raise FileNotFoundError(f'--root {root} is not a folder')
        if name == 'avss':
            self.classes = _avss_classes(root)
            self.rows = _avss_rows(root, split, subsets)
        else:
            self.classes = list(BINARY_CLASSES)
            self.rows = (_s4_rows if name == 's4' else _ms3_rows)(root, split)
        if not self.rows:
            raise ValueError(f'no {split} frames for {name} under {root}'
                             + (f' in subsets {subsets}' if name == 'avss' else ''))
        self.num_classes = len(self.classes)
        self.subset, self.split = name, split
        self.palette = palette(self.num_classes) if name == 'avss' else None
        self.train, self.resize, self.seed, self.scale = train, resize, seed, tuple(scale)
        self.crop = crop or resize or 512
        self.audio_transform = vggish_audio

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        row = self.rows[index]
        image = _open_frame_file(row['image'], row).convert('RGB')
        mask = _open_frame_file(row['mask'], row)
        label = (binary_label(mask) if self.palette is None
                 else semantic_label(mask, self.palette, row['mask']))                 # H, W uint8
        if label.shape != (image.height, image.width):
            raise ValueError(f'{row["mask"]} is {label.shape[::-1]} (w, h) but {row["image"]} is '
                             f'{image.size}')
        # classes heard, from the full-size mask, before a crop can cut an object out
        t = torch.zeros(self.num_classes)
        present = np.unique(label)
        t[torch.from_numpy(present[(present > 0) & (present < self.num_classes)].astype(np.int64))] = 1.0
        label = Image.fromarray(label)
        if self.resize:   # Tables 1-2: resize x resize, aspect not kept, as the official test loaders
            image = image.resize((self.resize, self.resize), Image.BILINEAR)
            label = label.resize((self.resize, self.resize), Image.NEAREST)
        if self.train:    # a flip cannot mirror the audio: AVSBench audio is mono
            rng = np.random.default_rng([self.seed, epoch, index])
            image, label, _ = joint_augment(image, label, crop=self.crop, scale=self.scale, rng=rng)
        x, y = normalise(image), torch.from_numpy(np.array(label, dtype=np.int64))        # (3, H, W), (H, W)
        w = audio_segment(row['audio'], row['segment'], row)[None]                     # A=1, L=15600
        single = t.sum().item() == 1
        return {'image': x, 'audio': vggish_audio(w), 'wave': w,                       # audio: A=1, T=96, F=64
                'label': y, 't': t, 'index': index,
                'bank_wave': w[0] if single else torch.zeros(EXAMPLE_SAMPLES),
                'bank_cls': int(t.argmax()) if single else 0,
                'bank_alpha': 0.5}


# -----------------------------------------------------------------------------------------------
# choosing the source: --data and --root

def resolve_root(name, root=None, *, data_seed=0, progress=True):
    """(folder, kind) of the VPO source that --root names, kind 'vpo' | 'official' | 'builtin'. No root: the
    default built-in cache (ensure_builtin, generated from data_seed on first use). A given root must exist
    and be a VPO folder written by vpo.py (meta.json), the official release (VPO-SS/ VPO-MS/ VPO-MSMI/), or a
    built-in cache (builtin.json, or builtin.lock where a generation began) or its vpo/ child; anything else
    is a FileNotFoundError, so a mistyped --root is never filled with generated data. `name`: the --data subset
    (no root: its own miniature, builtin_folder(name, data_seed))."""
    if not root:
        return ensure_builtin(None, subset=name, data_seed=data_seed, progress=progress), 'builtin'
    cache = lambda d: any(os.path.isfile(os.path.join(d, f)) for f in ('builtin.json', 'builtin.lock'))
    parent = os.path.dirname(os.path.abspath(root))
    if cache(root):
        return ensure_builtin(root, subset=name, data_seed=data_seed, progress=progress), 'builtin'
    if os.path.isfile(os.path.join(root, 'meta.json')):
        if os.path.basename(os.path.abspath(root)) == 'vpo' and cache(parent):
            return ensure_builtin(parent, subset=name, data_seed=data_seed, progress=progress), 'builtin'
        return root, 'vpo'
    if any(os.path.isdir(os.path.join(root, d)) for d in OFFICIAL_DIRS):
        return root, 'official'
    state = ('does not exist' if not os.path.exists(root) else 'is not a folder' if not os.path.isdir(root)
             else 'is empty' if not os.listdir(root) else 'holds none of them')
    raise FileNotFoundError(f'--root {root} {state}: expected a VPO folder written by vpo.py (meta.json), the '
                            f'official release ({"/ ".join(OFFICIAL_DIRS)}/) or a built-in cache (builtin.json) '
                            f'for --data {name}')


def build_dataset(name, root=None, split='train', *, train=False, crop=512, scale=(0.5, 2.0), audio_seconds=3.0,
                  mono=False, seed=0, data_seed=0, resize=None, subsets=None, test_scale=1.0, progress=True):
    """The Dataset for --data name on `split` (train / val / test). seed: augmentation only; data_seed: the
    built-in source's generation (real data ignores it). subsets: AVSS v1s / v1m / v2 (Table 3);
    test_scale: VPO only, the factor evaluation images are resized by (labels stay at original size).
    progress: print what is generated or derived on first use."""
    if name in AVSBENCH:
        if not root:
            raise ValueError(f'--data {name} needs --root: the folder of the released AVSBench files')
        if test_scale != 1:
            raise ValueError(f'test_scale={test_scale}: AVSBench evaluates at --resize or original resolution')
        return AVSBenchDataset(root, name, split, train=train, crop=resize or crop, scale=scale, resize=resize,
                               subsets=subsets, seed=seed)
    if name not in VPO_SUBSETS:
        raise ValueError(f'unknown --data {name!r}; known: {", ".join(VPO_SUBSETS + AVSBENCH)}')
    path, kind = resolve_root(name, root, data_seed=data_seed, progress=progress)
    rows = vpo.read_official(path, name, split, progress=progress) if kind == 'official' else None
    return VPODataset(path, name, split, train=train, crop=crop, scale=scale, audio_seconds=audio_seconds,
                      mono=mono, seed=seed, rows=rows, test_scale=test_scale)


# ===============================================================================================
# THE BUILT-IN OFFLINE SOURCE - NOT PART OF THE PAPER.
# It generates files in the real formats, COCO 2017 (instances / captions JSON, JPEGs) and a
# VGGSound-style audio bank (one folder per VGGSound label of Table 7), from a seed, so that everything
# runs offline through the same code path as real data: vpo.build() -> VPO manifest -> VPODataset.
# ===============================================================================================

BUILTIN_VERSION = 4   # part of the cache stamp: a cache written by another version of the generator is rebuilt
# One miniature per subset, each drawn for its subset and built by the same vpo.build(): COCO's 118k images give
# every subset thousands of rows, but a miniature drawn once would give VPO-MS and VPO-MSMI a few hundred (every
# VPO-SS image is multi-class, a third of them multi-instance). The draws differ only in the objects placed
# (_make_image); n_train / n_val are COCO train2017 / val2017 images, clips_per_class the clips of each class.
BUILTIN_SIZE = {'vpo_ss': dict(n_train=1200, n_val=200, clips_per_class=16),
                'vpo_ms': dict(n_train=2000, n_val=300, clips_per_class=32),
                'vpo_msmi': dict(n_train=2000, n_val=300, clips_per_class=32)}
SIZE_KEYS = ('n_train', 'n_val', 'clips_per_class')

# Appearance of each visual label: (shape, texture, hue in degrees). Every (shape, texture) pair is
# unique and labels that share a shape sit >= 40 degrees apart in hue, so the 21 classes are told apart
# by appearance; intra-class variety (hue +-12, saturation, value, size, aspect, rotation, texture
# period) keeps colour alone from being a lookup. male/female/baby are COCO 'person'; captions name them.
LOOKS = {
    'airplane': ('cross', 'solid', 210), 'baby': ('figure', 'dots', 50), 'bird': ('star', 'solid', 55),
    'bus': ('rect', 'stripes', 60), 'car': ('rect', 'solid', 0), 'cat': ('triangle', 'stripes', 40),
    'cell phone': ('rect', 'dots', 270), 'cow': ('hexagon', 'dots', 130), 'dog': ('ellipse', 'solid', 30),
    'elephant': ('hexagon', 'solid', 220), 'female': ('figure', 'stripes', 330),
    'horse': ('ellipse', 'stripes', 110), 'keyboard': ('diamond', 'dots', 200), 'male': ('figure', 'solid', 235),
    'motorcycle': ('diamond', 'solid', 300), 'mouse': ('triangle', 'dots', 160), 'sheep': ('ellipse', 'dots', 190),
    'skateboard': ('diamond', 'stripes', 90), 'sports ball': ('star', 'dots', 340),
    'tennis racket': ('star', 'stripes', 140), 'zebra': ('hexagon', 'stripes', 0),
}
CAPTION_WORD = {'male': 'man', 'female': 'woman', 'baby': 'baby'}   # person group -> word written in captions
DISTRACTORS = {'chair': 62, 'bottle': 44, 'potted plant': 64, 'clock': 85}  # non-VPO COCO categories
# Sound of each visual label: a frequency band (7 bands, x1.5 apart) x a temporal pattern (steady,
# pulsed, sweeping), one pair per class; variety: pitch +-8%, harmonics, pulse rate, noise, level.
BANDS = (200, 300, 450, 675, 1000, 1500, 2250)
CROSS = [(0.35, 1), (-0.35, 1), (-0.35, 0.35), (-1, 0.35), (-1, -0.35), (-0.35, -0.35),
         (-0.35, -1), (0.35, -1), (0.35, -0.35), (1, -0.35), (1, 0.35), (0.35, 0.35)]
CORNERS = {'ellipse': 24, 'rect': 4, 'triangle': 3, 'diamond': 4, 'hexagon': 6, 'star': 10,
           'semicircle': 13, 'trapezoid': 4, 'pentagon': 5}
TURN = {'rect': np.pi / 4, 'triangle': -np.pi / 2, 'trapezoid': np.pi / 4}   # start angle of the corners


def _polygon(shape, cx, cy, rx, ry, rot):
    """Vertices (list of flat [x0, y0, x1, ...] parts) of a shape centred at (cx, cy)."""
    if shape == 'figure':  # a person: head + body, two polygon parts of one annotation
        head = _polygon('ellipse', cx, cy - 0.62 * ry, 0.38 * rx, 0.36 * ry, 0)[0]
        body = _polygon('rect', cx, cy + 0.32 * ry, 0.6 * rx, 0.62 * ry, rot)[0]
        return [head, body]
    if shape == 'cross':  # a plus sign, arms 0.35 wide
        x, y = np.array(CROSS, np.float64).T
    else:
        k = CORNERS[shape]
        a = np.arange(k) * 2 * np.pi / k + TURN.get(shape, 0)
        if shape == 'semicircle':
            a = np.linspace(0, np.pi, k)
        r = np.full(k, math.sqrt(2) if shape in ('rect', 'trapezoid') else 1.0)
        if shape == 'star':
            r[1::2] = 0.45
        x, y = r * np.cos(a), r * np.sin(a)
        if shape == 'trapezoid':
            x = x * np.where(y < 0, 0.6, 1.0)
    c, s = math.cos(rot), math.sin(rot)
    px, py = cx + rx * (c * x - s * y), cy + ry * (s * x + c * y)
    return [np.stack([px, py], 1).ravel().round(1).tolist()]


def _hsv(h, s, v):
    c = v * s
    x = c * (1 - abs((h / 60) % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h // 60) % 6]
    return np.array([r + v - c, g + v - c, b + v - c], np.float32)


def _texture(texture, colour, h, w, rng):
    """(h, w, 3) paint of an object: solid, stripes (random angle, period) or dots."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(5, 9)
    dark = colour * rng.uniform(0.35, 0.6)
    if texture == 'stripes':
        ang = rng.uniform(0, np.pi)
        on = (np.cos(ang) * xx + np.sin(ang) * yy + rng.uniform(0, period)) % period < period / 2
    elif texture == 'dots':
        on = np.hypot((xx % period) - period / 2, (yy % period) - period / 2) < period / 3.2
    else:
        on = np.zeros((h, w), bool)
    paint = np.where(on[..., None], dark, colour)
    return paint + rng.normal(0, 0.02, (h, w, 3)).astype(np.float32)


def _rle(mask):
    """Uncompressed COCO RLE (column-major run lengths, starting with a run of zeros)."""
    flat = mask.T.ravel().astype(np.uint8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {'counts': ([0] + counts) if flat[0] else counts, 'size': list(mask.shape)}


def _annotation(image_id, category_id, segmentation, m, iscrowd):
    """A COCO instance annotation (without its id) of mask m (H, W bool)."""
    ys, xs = np.nonzero(m)
    bbox = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
    return {'image_id': image_id, 'category_id': category_id, 'segmentation': segmentation, 'iscrowd': iscrowd,
            'area': float(m.sum()), 'bbox': bbox}


def _place(cls, band, boxes, W, H, rng, grow=1.0):
    """(cx, cy, rx, ry, box) of a new object clear of `boxes` (rejection sampling, 30 tries), or None.
    Objects do not overlap, so their polygons are their visible masks. band: (lo, hi), the part of the
    image width (fractions) the centre is drawn from; grow: size factor."""
    for _ in range(30):
        r = min(W, H) * rng.uniform(0.14, 0.24) * {'baby': 1.1, 'male': 1.3, 'female': 1.3}.get(cls, 1.0) * grow
        rx, ry = r * rng.uniform(0.8, 1.25), r * rng.uniform(0.8, 1.25)
        lo, hi = max(rx + 2, band[0] * W), min(W - rx - 2, band[1] * W)
        if lo >= hi or ry + 2 >= H - ry - 2:
            continue
        cx, cy = rng.uniform(lo, hi), rng.uniform(ry + 2, H - ry - 2)
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        if all(box[2] < b[0] - 2 or box[0] > b[2] + 2 or box[3] < b[1] - 2 or box[1] > b[3] + 2 for b in boxes):
            return cx, cy, rx, ry, box
    return None


def _draw(img, cls, cx, cy, rx, ry, rng):
    """Paint object `cls` centred at (cx, cy) into img (H, W, 3); (img, polygon, mask H x W bool)."""
    H, W = img.shape[:2]
    if cls in LOOKS:
        shape, texture, hue = LOOKS[cls]
        colour = _hsv((hue + rng.uniform(-12, 12)) % 360, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
    else:
        shape = str(rng.choice(['semicircle', 'trapezoid', 'pentagon']))
        texture = str(rng.choice(['solid', 'stripes', 'dots']))
        colour = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9))
    poly = _polygon(shape, cx, cy, rx, ry, rng.uniform(-0.3, 0.3))
    m = Image.new('L', (W, H), 0)
    for part in poly:
        ImageDraw.Draw(m).polygon(part, fill=1)
    m = np.asarray(m, bool)
    if m.any():
        img = np.where(m[..., None], _texture(texture, colour, H, W, rng), img)
    return img, poly, m


ANYWHERE, LEFT, RIGHT = (0.0, 1.0), (0.0, 0.4), (0.6, 1.0)


def _make_image(image_id, rng, cat_ids, image_size=None, draw='vpo_ss'):
    """One image + its annotations + captions, drawn for subset `draw`. Every vpo_ss / vpo_ms image is drawn
    with >= 2 VPO classes (so only the audio says which object sounds). vpo_ss: a third hold 2 instances of one
    class far apart (so only stereo says which one); vpo_ms: 3-5 classes, none twice (vpo.py lets N > 2
    candidates sound 2..N-1 of them: some stay silent, Sec. 3); vpo_msmi: always those two instances, 1.3x
    larger (its crops hold all or most of the image, so objects are small in them), and 0-2 other classes."""
    W, H = image_size or (int(rng.integers(128, 225)), int(rng.integers(112, 193)))
    c0, c1 = (_hsv(rng.uniform(0, 360), rng.uniform(0, 0.25), rng.uniform(0.35, 0.8)) for _ in range(2))
    g = np.linspace(0, 1, W, dtype=np.float32)[None, :, None]
    img = (c0 * (1 - g) + c1 * g) + rng.normal(0, 0.03, (H, W, 3)).astype(np.float32)
    names = [c for c in vpo.VPO_CLASSES[1:]]
    person = [c for c in names if c in CAPTION_WORD]
    others = [c for c in names if c not in CAPTION_WORD]
    k = int(rng.integers(2, 5)) if draw != 'vpo_ms' else int(rng.integers(3, 6))
    pool = others + [person[int(rng.integers(3))]]        # at most one kind of person per image
    chosen = list(rng.choice(pool, size=k, replace=False))
    objs = [(c, ANYWHERE) for c in chosen]
    if draw == 'vpo_ss' and rng.random() < 0.35:  # a second instance of one class, on the other side
        objs = [(chosen[0], LEFT), (chosen[0], RIGHT)] + objs[1:]
    if draw == 'vpo_msmi':   # the pair first, so that both find room
        objs = [(chosen[0], LEFT), (chosen[0], RIGHT)] + objs[1:int(rng.integers(1, k))]
    objs += [(d, ANYWHERE) for d in rng.choice(list(DISTRACTORS), size=int(rng.integers(0, 3)), replace=False)]
    boxes, anns = [], []
    for j, (cls, band) in enumerate(objs):
        placed = _place(cls, band, boxes, W, H, rng, grow=1.3 if draw == 'vpo_msmi' and j < 2 else 1.0)
        if placed is None:
            continue
        cx, cy, rx, ry, box = placed
        boxes.append(box)
        img, poly, m = _draw(img, cls, cx, cy, rx, ry, rng)
        if m.any():
            anns.append(_annotation(image_id, cat_ids[cls], poly, m, 0))
    if rng.random() < 0.05:  # a crowd region (RLE, iscrowd = 1) of small blobs of one VPO class
        cls = str(rng.choice(others))
        m = np.zeros((H, W), bool)
        yy, xx = np.mgrid[0:H, 0:W]
        for _ in range(4):
            m |= np.hypot(xx - rng.uniform(0, W), yy - rng.uniform(0, 0.2 * H)) < rng.uniform(3, 6)
        img = np.where(m[..., None], _hsv(LOOKS[cls][2], 0.8, 0.8), img)
        if m.any():
            anns.append(_annotation(image_id, cat_ids[cls], _rle(m), m, 1))
    words = [CAPTION_WORD[c] for c in {c for c, _ in objs if c in CAPTION_WORD}]
    # the person rule of vpo.py reads captions: >= 2 of them must name the same group
    captions = [f'a {w} standing among shapes' for w in words] + [f'shapes around a {w}' for w in words]
    pixels = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return pixels, anns, captions or ['coloured shapes']


def _make_clip(k, variant, rng, sr, seconds):
    """A clip of visual class index k (1..21): band (k-1) % 7, pattern (k-1) // 7 (steady / pulsed /
    sweeping), with pitch, harmonics, rhythm, noise and level drawn per clip."""
    n = int(seconds * sr)
    t = np.arange(n, dtype=np.float64) / sr
    f0 = BANDS[(k - 1) % 7] * rng.uniform(0.92, 1.08) * (1 + 0.02 * variant)
    pattern = (k - 1) // 7
    if pattern == 2:  # sweeping: the pitch glides up by ~30% and restarts, 1.5-3 times a second
        f = f0 * (1 + 0.3 * ((t * rng.uniform(1.5, 3.0)) % 1.0))
        phase = 2 * np.pi * np.cumsum(f) / sr
    else:
        phase = 2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi)
    x = sum(0.6 ** h * np.sin((h + 1) * phase) for h in range(int(rng.integers(1, 4))))
    if pattern == 1:  # pulsed: 3-6 bursts a second
        rate, duty = rng.uniform(3, 6), rng.uniform(0.3, 0.5)
        x = x * (((t * rate + rng.uniform()) % 1.0) < duty)
    x = x + rng.normal(0, rng.uniform(0.02, 0.25), n)
    return (x / (np.abs(x).max() + 1e-8) * rng.uniform(0.2, 0.9)).astype(np.float32)


def _stream(seed, draw, *key):
    """The random stream of one image or clip: vpo_ss keeps its original streams, the other draws their own."""
    return np.random.default_rng([seed, *key] + ([] if draw == 'vpo_ss' else [VPO_SUBSETS.index(draw)]))


def _write_builtin_image(job):
    """Worker of make_builtin: draw image `image_id` from its own seed, write the JPEG, return its records."""
    seed, draw, image_id, folder, cat_ids, image_size = job
    pixels, anns, captions = _make_image(image_id, _stream(seed, draw, 0, image_id), cat_ids, image_size, draw)
    name = f'{image_id:012d}.jpg'
    Image.fromarray(pixels).save(os.path.join(folder, name), quality=92)
    return {'id': image_id, 'file_name': name, 'height': pixels.shape[0], 'width': pixels.shape[1]}, anns, captions


def _write_clip(job):
    """Worker of make_builtin: synthesise clip j of class index k from its own seed and write it."""
    seed, draw, k, j, audio = job
    rng = _stream(seed, draw, 1, k, j)
    labels = vpo.TABLE7[vpo.VPO_CLASSES[k]]
    label = labels[j % len(labels)]
    sr = int(rng.choice([16000, 22050, 44100]))
    seconds = rng.uniform(0.6, 1.0) if rng.random() < 0.15 else rng.uniform(2.0, 10.0)
    x = _make_clip(k, j % len(labels), rng, sr, seconds)
    if rng.random() < 0.3:  # a stereo file: the same sound, slightly different per channel
        x = np.stack([x, x * rng.uniform(0.7, 1.0)], 1)
    ext = str(rng.choice(['wav', 'wav', 'flac', 'ogg']))
    folder = os.path.join(audio, vpo.folder_name(label))
    os.makedirs(folder, exist_ok=True)
    sf.write(os.path.join(folder, f'b{k:02d}{j:03d}x_{10 * j:06d}.{ext}'), x, sr)


def _write_coco_split(coco, split, ids, seed, draw, cat_ids, categories, image_size, imap, ann_id):
    """Images, instances_{split}.json and captions_{split}.json of one COCO split; returns the next ann id."""
    os.makedirs(os.path.join(coco, split), exist_ok=True)
    images, anns, caps = [], [], []
    for image, a, c in imap(_write_builtin_image, [(seed, draw, i, os.path.join(coco, split), cat_ids, image_size)
                                                   for i in ids]):
        images.append(image)
        for x in a:
            x['id'] = ann_id
            ann_id += 1
        anns += a
        caps += [{'id': len(caps) + 1 + j, 'image_id': image['id'], 'caption': s} for j, s in enumerate(c)]
    cats = [{'id': i, 'name': c, 'supercategory': 'builtin'} for i, c in categories]
    for kind, body in (('instances', {'annotations': anns, 'categories': cats}), ('captions', {'annotations': caps})):
        with open(os.path.join(coco, 'annotations', f'{kind}_{split}.json'), 'w') as f:
            json.dump({'info': {'description': 'cavp built-in source', 'seed': seed}, 'images': images, **body}, f)
    return ann_id


def make_builtin(root, *, seed=0, n_train=1200, n_val=200, clips_per_class=16, image_size=None, progress=True,
                 workers=None, draw='vpo_ss'):
    """Write the built-in source under root: coco/ (COCO 2017 layout: annotations/instances_*.json,
    captions_*.json, train2017/, val2017/) and audio/ (one folder per VGGSound label of Table 7, clips at
    16 / 22.05 / 44.1 kHz, mono and stereo, wav / flac / ogg, 0.6-10 s long). Every image and clip draws
    from its own seed (seed, image id) / (seed, class, clip), so the files are the same whatever the number
    of worker processes (default: one per CPU core, at most 8). draw: the subset the images are drawn for."""
    coco, audio = os.path.join(root, 'coco'), os.path.join(root, 'audio')
    cat_ids = {**{c: vpo.COCO_IDS[c] for c in LOOKS}, **DISTRACTORS}   # male/female/baby -> 1 'person'
    categories = sorted({(i, 'person' if c in CAPTION_WORD else c) for c, i in cat_ids.items()})
    os.makedirs(os.path.join(coco, 'annotations'), exist_ok=True)
    splits = (('train2017', range(1, n_train + 1)), ('val2017', range(n_train + 1, n_train + n_val + 1)))
    clips = [(seed, draw, k, j, audio) for k in range(1, len(vpo.VPO_CLASSES))
             for j in range(max(clips_per_class, 2 * len(vpo.TABLE7[vpo.VPO_CLASSES[k]])))]
    workers = workers or min(os.cpu_count() or 1, 8)
    # fork (as DataLoader workers do on Linux): the workers only run numpy / PIL / soundfile, and a spawned
    # child would re-import the caller's __main__, which fails for stdin scripts and notebooks
    ctx = multiprocessing.get_context('fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn')
    pool = ctx.Pool(workers) if workers > 1 else None
    imap = functools.partial(pool.imap, chunksize=8) if pool else map
    try:
        ann_id = 1
        for split, ids in splits:
            ann_id = _write_coco_split(coco, split, ids, seed, draw, cat_ids, categories, image_size, imap, ann_id)
        for _ in imap(_write_clip, clips):
            pass
    finally:
        if pool:
            pool.close()
            pool.join()
    return coco, audio


def _cache_ready(root, params, exact):
    """Whether root holds a complete built-in cache for params: its stamp builtin.json (written last) matches
    them, or, when `exact` is False, matches their version and seed."""
    stamp = os.path.join(root, 'builtin.json')
    if not (os.path.isfile(stamp) and os.path.isfile(os.path.join(root, 'vpo', 'meta.json'))):
        return False
    try:
        old = vpo.read_json(stamp)
    except ValueError:   # a damaged stamp: the cache is rebuilt
        return False
    return isinstance(old, dict) and (old == params or (not exact and all(old.get(k) == params[k]
                                                                          for k in ('version', 'seed'))))


def builtin_folder(subset='vpo_ss', data_seed=0):
    """Where the default miniature of `subset` is cached: data/ beside the code for VPO-SS, data/<subset>/ for
    the others, with seed<N>/ below for data seed N > 0, so no two caches ever overwrite each other."""
    return os.path.join(HERE, 'data', *([subset] if subset != 'vpo_ss' else []),
                        *([f'seed{data_seed}'] if data_seed else []))


def ensure_builtin(root=None, *, subset='vpo_ss', data_seed=0, progress=True, **size):
    """The built-in VPO tree under root (default builtin_folder(subset, data_seed)), drawn for `subset` with
    its BUILTIN_SIZE from data_seed on first use and reused; regenerated when data_seed, the draw, the sizes
    or BUILTIN_VERSION change. A call with a root that names no size takes whatever tree is cached there
    (tests and smoke runs build smaller ones). Generation holds an exclusive lock on root/builtin.lock: a
    process that starts while another generates waits, then finds the cache complete and uses it. Returns
    the VPO root (root/vpo); all three subsets are built in every tree."""
    exact = bool(size) or not root
    root = root or builtin_folder(subset, data_seed)
    params = {'version': BUILTIN_VERSION, 'seed': data_seed, 'draw': subset, **BUILTIN_SIZE[subset], **size}
    out = os.path.join(root, 'vpo')
    if _cache_ready(root, params, exact):
        return out
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, 'builtin.lock'), 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file is closed
        if _cache_ready(root, params, exact):   # built by another process while this one waited
            return out
        stamp = os.path.join(root, 'builtin.json')
        if os.path.exists(stamp):
            os.remove(stamp)   # incomplete from here until the new stamp
        for sub in ('coco', 'audio', 'vpo'):
            shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
        t0 = time.time()
        if progress:
            print(f'building the built-in source in {root} ({params}) ...', flush=True)
        coco, audio = make_builtin(root, seed=data_seed, progress=progress, draw=subset,
                                   **{k: params[k] for k in SIZE_KEYS})
        vpo.build(coco, audio, out, seed=data_seed, progress=progress)
        tmp = f'{stamp}.{os.getpid()}.tmp'
        with open(tmp, 'w') as f:
            json.dump(params, f)
        os.replace(tmp, stamp)
        if progress:
            print(f'built-in source ready in {time.time() - t0:.1f} s', flush=True)
    return out


# -----------------------------------------------------------------------------------------------
# CLI: a look at the data, and the loader's throughput

def preview(ds, n, path):
    """A PNG of n samples: image | label overlay | log-mel of each audio plane (low frequencies at the bottom)."""
    if not len(ds):
        raise ValueError(f'{ds.subset} {ds.split} has no samples: nothing to preview')
    rows, colour = [], palette()
    for i in range(min(n, len(ds))):
        s = ds.load(i)
        img = ((s['image'].permute(1, 2, 0).numpy() * STD + MEAN).clip(0, 1) * 255).astype(np.uint8)
        y = s['label'].numpy()
        over = np.where((y > 0)[..., None], 0.4 * img + 0.6 * colour[y], img).astype(np.uint8)
        over[y == 255] = 255
        panels = [Image.fromarray(img), Image.fromarray(over)]
        for plane in s['audio']:                                    # (T, 64) per plane
            m = plane.numpy().T[::-1]                                # 64 x T, low frequencies at the bottom
            m = ((m - m.min()) / (np.ptp(m) + 1e-8) * 255).astype(np.uint8)
            panels.append(Image.fromarray(m).resize((img.shape[1], img.shape[0])))
        rows.append(panels)
    sheet = Image.new('RGB', (sum(p.width + 4 for p in rows[0]), sum(r[0].height + 16 for r in rows)), 'white')
    draw, y0 = ImageDraw.Draw(sheet), 0
    for i, panels in enumerate(rows):
        row = ds.rows[i]
        sounding = ', '.join(f"{o['cls']} (alpha {o['alpha']:.2f})" for o in row['objects'] if o['sounding'])
        draw.text((2, y0 + 2), f"{row['id']}: sounding {sounding} | panels: image, label, log-mel L, R", fill='black')
        x0 = 0
        for p in panels:
            sheet.paste(p.convert('RGB'), (x0, y0 + 16))
            x0 += p.width + 4
        y0 += panels[0].height + 16
    sheet.save(path)
    return path


def bench_loader(n, *, workers, crop, seconds, seed=0):
    """Training samples/s of one DataLoader at the paper's setting (crop, 3 s stereo) on 640 x 480 JPEGs."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        coco, audio = make_builtin(tmp, seed=seed, n_train=48, n_val=8, clips_per_class=4, image_size=(640, 480),
                                   progress=False)
        vpo.build(coco, audio, os.path.join(tmp, 'vpo'), seed=seed, progress=False)
        ds = VPODataset(os.path.join(tmp, 'vpo'), 'vpo_ss', 'train', train=True, crop=crop, audio_seconds=seconds,
                        seed=seed)
        keys = [(e, i) for e in range(-(-(n + 32) // len(ds))) for i in range(len(ds))][:n + 32]
        collate = lambda ks: torch.utils.data.default_collate([ds[k] for k in ks])
        loader = torch.utils.data.DataLoader(keys, batch_size=8, num_workers=workers, collate_fn=collate)
        it = iter(loader)
        for _ in range(4):   # warm-up: worker start, first decodes
            next(it)
        t0, seen = time.perf_counter(), 0
        for b in it:
            seen += len(b['index'])
        return seen / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description='Look at a VPO subset: summary and a preview PNG (image, label, '
                                            'stereo log-mel).')
    p.add_argument('--data', default='vpo_msmi', choices=VPO_SUBSETS, help='subset')
    p.add_argument('--root', default=None, help='VPO folder, official release or built-in cache (default data/)')
    p.add_argument('--data-seed', type=int, default=0, help='seed of the built-in source (no --root)')
    p.add_argument('--split', default='train', choices=['train', 'val', 'test'], help='split to preview')
    p.add_argument('--n', type=int, default=4, help='samples in the preview')
    p.add_argument('--out', default=None, help='preview PNG (default <data>_<split>_preview.png)')
    p.add_argument('--audio-seconds', type=float, default=3.0, help='audio window of the preview')
    p.add_argument('--bench-loader', type=int, default=0,
                   help='time N training samples (paper setting, 640x480 JPEGs) and exit')
    p.add_argument('--workers', type=int, default=1, help='loader processes for --bench-loader')
    p.add_argument('--crop', type=int, default=512, help='train crop for --bench-loader')
    a = p.parse_args(argv)
    if a.bench_loader:
        sps = bench_loader(a.bench_loader, workers=a.workers, crop=a.crop, seconds=a.audio_seconds)
        print(f'{sps:.1f} training samples/s with {a.workers} worker(s): crop {a.crop}, '
              f'{a.audio_seconds:g} s stereo, 640x480 JPEGs')
        return
    try:
        path, _ = resolve_root(a.data, a.root, data_seed=a.data_seed)
        if os.path.exists(os.path.join(path, 'summary.json')):
            vpo.print_summary(vpo.read_json(os.path.join(path, 'summary.json')))
        sets = {s: build_dataset(a.data, a.root, s, audio_seconds=a.audio_seconds, data_seed=a.data_seed)
                for s in ('train', 'val', 'test')}
        for split, ds in sets.items():
            n_src = [sum(o['sounding'] for o in r['objects']) for r in ds.rows]
            print(f'{a.data} {split}: {len(ds)} samples, {len({r["image_id"] for r in ds.rows})} images, '
                  f'{np.mean(n_src) if n_src else 0:.2f} sounding objects per sample')
        print('preview ->', preview(sets[a.split], a.n, a.out or f'{a.data}_{a.split}_preview.png'))
    except (ValueError, OSError, KeyError, RuntimeError) as e:   # bad input: one line, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
