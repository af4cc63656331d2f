"""CAVP model (Sec. 4.1): a DeepLabV3+ image branch, a ResNet-18 audio branch and the cross-attention fusion f_CA.

    x (B, 3, H, W)  -- ResNet (dilated) + ASPP + DeepLabV3+ decoder -->  u_v (B, D, H/4, W/4)   forward_image
    a (B, A, T, F)  -- ResNet-18 over the log-mel, pooled, Linear -->  u_a (B, D), one token  forward_audio
    z, attn = f_CA(u_v, u_a)           z (B, D, H/4, W/4), attn (B, heads, H/4, W/4)          fuse
    logits = 3x3 convs + classifier on z, upsampled to (H, W)                                 classify

The image branch is run once per image and fused with as many audio inputs as the loss needs (Sec. 4.2
pairs each image with its own and a permuted audio). D = 304 = 256 (ASPP) + 48 (layer1), as official.
"""
import argparse
import contextlib
import pickle
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.segmentation.deeplabv3 import ASPP

# resnet10 = ResNet-18 with one BasicBlock per stage ([1, 1, 1, 1]), about half its convolutions: the CPU
# preset's trunk. torchvision ships no weights for it (random init or a local state-dict file only).
IMAGE_BACKBONES = ('resnet10', 'resnet18', 'resnet34', 'resnet50', 'resnet101')
NO_IMAGENET = ('resnet10',)   # archs without a torchvision ImageNet file
AUDIO_BACKBONES = ('resnet10', 'resnet18', 'vggish')
ATTN = ('sigmoid', 'softmax', 'minmax', 'channel', 'tpavi')  # Fig. 6 and Table 5 row 1
# DeepLabV3+ widths as shares of the fused width D, in the official proportions: D = 304 = 256 (ASPP) + 48
# (layer1 reduced), head convs 256 wide. A smaller D (the CPU preset's 76 = 64 + 12) scales all three.
def widths(dim):
    low = dim * 3 // 19                  # 48 at D = 304
    return low, dim - low                # (layer1 reduce, ASPP = head width)


MLP_RATIO = 2        # f_CA's MLP hidden width = 2 D; official 4 D, halved to keep f_CA under 10% of the image branch


# ----------------------------------------------------------------------------- weights

# torchvggish's released VGGish network (the PCA file is not needed: VGGish runs without its postprocessor)
VGGISH_URL = 'https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth'


def hub_file(url, *, arg):
    """The path of `url`'s file in the torch hub cache (TORCH_HOME/hub/checkpoints/), fetched once when it is not
    there, as torchvision's weights API does (torch.hub.load_state_dict_from_url: progress bar, the sha256 checked
    against the hash in the file name, an atomic rename). Afterwards it is read from the cache, with no network.
    Not cached and not downloadable (offline, or a hash mismatch): FileNotFoundError naming the file and where
    to copy it."""
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(url))
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        prefix = torch.hub.HASH_REGEX.search(os.path.basename(path)).group(1)   # 'f37072fd' of resnet18-f37072fd.pth
        torch.hub.download_url_to_file(url, path, hash_prefix=prefix)
    except (OSError, RuntimeError) as e:   # URLError is an OSError; a wrong hash is a RuntimeError
        reason = ' '.join(str(getattr(e, 'reason', e)).split())[:120]
        raise FileNotFoundError(f'{arg}: {os.path.basename(path)} is not in {os.path.dirname(path)}/ and could not '
                                f'be downloaded ({reason}); offline, fetch {url} elsewhere and copy it there') from None
    return path


def imagenet_url(arch):
    """torchvision's IMAGENET1K_V1 file of `arch` (its weights API's first ImageNet weights)."""
    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url


def load_weights(net, weights, *, arch, arg):
    """Load `weights` into the ResNet trunk `net`, strictly. weights: None (random init, an explicit choice),
    'imagenet' (torchvision's file, from the torch hub cache, fetched once: hub_file) or the path of a state-dict
    file.
    `fc.*` keys (the ImageNet classifier, which the trunk does not have) are dropped by name; every other key
    must match in name and shape, else the error names them (the official code loads with strict=False and
    silently ignores mismatches)."""
    if weights is None:
        return
    path = weights
    if weights == 'imagenet':
        if arch in NO_IMAGENET:
            raise ValueError(f"{arg}='imagenet': torchvision has no ImageNet weights for {arch}; "
                             f"use 'none' or the path of a {arch} state-dict file")
        path = hub_file(imagenet_url(arch), arg=f"{arg}='imagenet' ({arch})")
    elif not os.path.isfile(path):
        raise FileNotFoundError(f'{arg}={weights!r}: no such file')
    state = torch.load(path, map_location='cpu', weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith('fc.')}
    rgb, planes = state.get('conv1.weight'), net.conv1.in_channels
    fresh = set()
    if rgb is not None and rgb.shape[1] == 3 and planes != 3:
        # Audio trunk from an RGB checkpoint: conv1 keeps its random init for the 1-2 log-mel planes, as the
        # official audio net does (models/audio/audio_network.py replaces conv1 of torchvision's ImageNet ResNet-18).
        del state['conv1.weight']
        fresh.add('conv1.weight')
    own = net.state_dict()
    # Old torchvision files lack BatchNorm's num_batches_tracked; load_state_dict fills it in, so it is not "missing".
    problems = [(what, sorted(keys)) for what, keys in (
        ('missing', [k for k in own.keys() - state.keys() - fresh if not k.endswith('num_batches_tracked')]),
        ('unexpected', state.keys() - own.keys()),
        ('wrong-shape', [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]))
        if keys]
    if problems:
        raise RuntimeError(f'{arg}={path!r} does not match the {arch} trunk: ' + '; '.join(
            f'{len(keys)} {what} keys ({", ".join(keys[:4])}{", ..." if len(keys) > 4 else ""})'
            for what, keys in problems))
    net.load_state_dict(state, strict=not fresh)   # strict but for the re-initialised conv1


# ----------------------------------------------------------------------------- backbones

def resnet_trunk(arch, *, in_planes=3, output_stride=32):
    """A torchvision ResNet without avgpool/fc, with `in_planes` input planes, dilated to `output_stride` 8/16/32."""
    if arch == 'resnet10':
        net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    else:
        net = getattr(torchvision.models, arch)(weights=None)
    del net.avgpool, net.fc  # unused: we read layer1/layer4 and pool the audio ourselves (no dead parameters)
    if in_planes != 3:
        net.conv1 = nn.Conv2d(in_planes, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return dilate(net, output_stride)


def dilate(net, output_stride):
    """Trade the strides of layer3/layer4 of a torchvision ResNet for dilations, in place (output stride 8 or 16).

    torchvision refuses replace_stride_with_dilation for BasicBlock (resnet18/34), so every arch is dilated here,
    the a-trous way: a layer's stride-2 convs get stride 1; its 3x3 convs up to and including the one that was
    strided keep the previous dilation, later ones (on the now twice-denser map) get twice it. The result equals
    the undilated net sampled every 32/output_stride pixels, and for Bottleneck it is exactly torchvision's
    replace_stride_with_dilation (both tested). For BasicBlock this differs from "one dilation per block"
    conventions: block 0's conv2 already sees the dense map, so it gets the new dilation."""
    dilation = 1
    for layer, stride in ((net.layer3, 16), (net.layer4, 32)):
        if stride <= output_stride:
            continue
        d, dilation = dilation, dilation * 2
        for conv in layer.modules():  # torchvision's blocks register their convs in forward order
            if isinstance(conv, nn.Conv2d):
                if conv.kernel_size == (3, 3):
                    conv.dilation = conv.padding = (d, d)
                    if conv.stride == (2, 2):
                        d = dilation
                conv.stride = (1, 1)
    return net


def stem(net, x):
    """conv1 + BN + ReLU + max pool of a ResNet trunk: (B, C, H, W) -> (B, 64, H/4, W/4)."""
    return net.maxpool(net.relu(net.bn1(net.conv1(x))))


class AudioResNet(nn.Module):
    """Audio branch f_gamma (App. B.1): ResNet-18 (or -10) over the log-mel, A = 1 (mono) or 2 (stereo) planes
    -> (B, 512)."""
    out_dim = 512

    def __init__(self, *, channels, weights, arch='resnet18'):
        super().__init__()
        self.net = resnet_trunk(arch, in_planes=channels)
        load_weights(self.net, weights, arch=arch, arg='audio_weights')

    def forward(self, a):
        n = self.net
        a = n.layer4(n.layer3(n.layer2(n.layer1(stem(n, a)))))  # B, 512, T/32, F/32 (300 x 64 -> 10 x 2)
        return a.amax((2, 3))  # B, 512: global max pool, as official (AdaptiveMaxPool2d)


VGGISH_PATCH = 96   # log-mel frames of one VGGish example (0.96 s)


class VGGish(nn.Module):
    """VGG-style audio network: (B, 1, 96, 64) log-mel example -> (B, 128) embedding.

    Module names match the torchvggish checkpoint (`features.{0,3,6,8,11,13}`, `embeddings.{0,2,4}`),
    so `load_state_dict(sd, strict=True)` works on such a file. The ReLU after the last Linear is
    kept because torchvggish (and so AVSBench/TPAVI) has it. The PCA whitening + 8-bit quantisation
    postprocessor is not part of this module: AVSBench runs VGGish with it off
    (POSTPROCESS_LOG_MEL_WITH_PCA = False), and the rounding has no gradient; `load_vggish_weights`
    drops `pproc.*` entries by name.
    """
    out_dim = 128

    def __init__(self, *, weights=None, freeze=False):
        super().__init__()
        # a checkpoint overwrites every parameter, so build on 'meta' and skip the ~3 s random init
        with torch.device('meta') if weights is not None else contextlib.nullcontext():
            layers, c_in = [], 1
            for v in (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M'):
                if v == 'M':
                    layers.append(nn.MaxPool2d(2, 2))
                else:
                    layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=True)]
                    c_in = v
            self.features = nn.Sequential(*layers)
            self.embeddings = nn.Sequential(
                nn.Linear(512 * 6 * 4, 4096), nn.ReLU(inplace=True),
                nn.Linear(4096, 4096), nn.ReLU(inplace=True),
                nn.Linear(4096, self.out_dim), nn.ReLU(inplace=True))
        if weights is not None:
            if weights == 'vggish':   # the torchvggish release, from the torch hub cache (fetched once)
                weights = hub_file(VGGISH_URL, arg="audio_weights='vggish'")
            sd = load_vggish_weights(weights)                             # fails before allocating
            self.to_empty(device='cpu')
            self.load_state_dict(sd, strict=True)
        if freeze:
            # no BatchNorm or dropout in VGGish, so train() and eval() behave the same; freezing
            # is only requires_grad
            self.requires_grad_(False)

    def forward(self, a):
        if a.dim() != 4 or tuple(a.shape[1:]) != (1, VGGISH_PATCH, 64):
            raise ValueError(f'VGGish expects (B, 1, {VGGISH_PATCH}, 64) log-mel, got {tuple(a.shape)}')
        x = self.features(a)                                              # B, 512, 6, 4
        # flatten in (H, W, C) order: the weights come from TensorFlow (NHWC), so the first Linear's
        # columns are laid out that way
        x = x.permute(0, 2, 3, 1).flatten(1)                              # B, 6*4*512
        return self.embeddings(x)                                         # B, 128


def load_vggish_weights(path):
    """State dict of a torchvggish-format checkpoint at `path`, ready for a strict load.

    `pproc.*` (PCA params a whole torchvggish VGGish module carries) are dropped on purpose, see
    VGGish; any other missing, extra or mis-shaped key raises ValueError naming the file and keys.
    """
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f'--audio-weights: no VGGish checkpoint at {path}') from None
    except pickle.UnpicklingError:
        # weights_only refuses pickled objects, e.g. the numpy arrays of vggish_pca_params-*.pth
        raise ValueError(f'--audio-weights {path} is not a plain tensor state dict (the PCA params '
                         f'file holds numpy arrays?); give the network checkpoint vggish-*.pth') from None
    if not isinstance(sd, dict):
        raise ValueError(f'--audio-weights {path}: expected a state dict, got {type(sd).__name__}')
    if sd and all(k.startswith('pca_') for k in sd):
        raise ValueError(f'--audio-weights {path} holds the VGGish PCA parameters {sorted(sd)}, '
                         f'not the network (torchvggish vggish-*.pth)')
    sd = {k: v for k, v in sd.items() if not k.startswith('pproc.')}
    with torch.device('meta'):                                            # shapes only, no 300 MB allocation
        expected = VGGish().state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f'{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}' for k, v in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise ValueError(f'--audio-weights {path} is not a torchvggish VGGish state dict: '
                         f'missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong[:4]}'
                         f'{" (...)" if max(len(missing), len(unexpected), len(wrong)) > 4 else ""}')
    return sd


# ----------------------------------------------------------------------------- fusion

class CrossAttention(nn.Module):
    """f_CA (Sec. 4.1), on the pixel tokens t = u_v (B, N = h*w, D) and the audio token s = LN(u_a) (B, 1, D):

        q = t W_q,  k = s W_k,  v = s W_v                        per head h: (B, N, d), (B, 1, d), (B, 1, d)
        u_v_hat = t + W_o [act(q_h k_h^T / sqrt(d)) v_h]_h         act = sigmoid                     (Sec. 4.1)
        z = LN(u_v_hat + MLP(u_v_hat))                             residual MLP + LayerNorm, as official

    `attn` picks act for the ablations (Fig. 6, Table 5): 'sigmoid' (ours) | 'softmax' over pixels (App. C: softmax
    "under spatial dimension"; over the keys it would be identically 1 with one audio token) | 'minmax' (logits
    min-max normalised over pixels) | 'channel' (AVSegFormer-style: the audio gives per-channel weights c,
    t + t * c) | 'tpavi' (audio query, softmax over pixel keys, t + t * f_MHA(s, t, t) broadcast to every pixel).

    Deviations from the official block (`Block` / `CROSS_ATTENTION` in `models/attn.py`), for speed at 128 x 128
    pixel tokens: two LayerNorms where the official layer has three (it pre-normalises both tokens with norm1, the
    MLP input with norm2, and the output with norm; we normalise the audio token and the output: u_v is the output
    of BatchNorm + ReLU already, and the residual goes onto u_v as in the paper's formula, not onto LN(u_v)); no
    visual pre-projection MLP / patch-embedding Linears (not in the paper); an MLP of width 2 D, not 4 D
    (MLP_RATIO); the audio token is not updated from the pixels (the official depth-1 block computes that and
    discards it). q, k, v have no bias, as official."""

    def __init__(self, *, dim, heads, attn):
        super().__init__()
        self.heads, self.attn = heads, attn
        self.norm_a = nn.LayerNorm(dim)  # the audio Linear's output has no normalisation of its own
        if attn != 'channel':  # channel attention has no query-key product
            self.q = nn.Linear(dim, dim, bias=False)
            self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.GELU(), nn.Linear(MLP_RATIO * dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, u_v, u_a):
        B, D, h, w = u_v.shape
        H, d, N = self.heads, D // self.heads, h * w
        t = u_v.flatten(2).transpose(1, 2)             # B, N, D  pixel tokens
        s = self.norm_a(u_a)[:, None]                  # B, 1, D  the audio token
        heads = lambda y: y.view(B, -1, H, d).transpose(1, 2)   # noqa: E731  B, n, D -> B, H, n, d
        if self.attn == 'channel':
            u_hat = t + t * self.o(self.v(s))                       # B, N, D: one gain per channel
            attn = t.new_ones(B, H, N, 1)                            # spatially uniform by construction
        elif self.attn == 'tpavi':
            q, k, v = heads(self.q(s)), heads(self.k(t)), heads(self.v(t))   # B, H, 1, d; B, H, N, d; B, H, N, d
            attn = (q @ k.transpose(-1, -2) / d ** 0.5).softmax(-1)         # B, H, 1, N  over pixel keys
            f = (attn @ v).transpose(1, 2).reshape(B, 1, D)                  # B, 1, D
            u_hat = t + t * self.o(f)                                        # B, N, D (Table 5 row 1)
            attn = attn.transpose(-1, -2)                                    # B, H, N, 1
        else:
            q, k, v = heads(self.q(t)), heads(self.k(s)), heads(self.v(s))   # B, H, N, d; B, H, 1, d; B, H, 1, d
            logits = q @ k.transpose(-1, -2) / d ** 0.5                      # B, H, N, 1
            if self.attn == 'sigmoid':   # Sec. 4.1: each pixel gated on its own, so many regions can light up
                attn = logits.sigmoid()
            elif self.attn == 'softmax':   # over pixels: sums to 1 per head, so it fades at large N (Fig. 11b)
                attn = logits.softmax(2)
            else:                          # 'minmax' over pixels, per sample and head
                lo, hi = logits.amin(2, keepdim=True), logits.amax(2, keepdim=True)
                attn = (logits - lo) / (hi - lo).clamp_min(1e-6)
            f = (attn @ v).transpose(1, 2).reshape(B, N, D)                  # B, N, D  [act(q_h k_h^T) v_h]_h
            u_hat = t + self.o(f)                                            # B, N, D  (Sec. 4.1)
        z = self.norm(u_hat + self.mlp(u_hat))                               # B, N, D
        return z.transpose(1, 2).reshape(B, D, h, w), attn.reshape(B, H, h, w)   # z: B, D, h, w; attn: B, H, h, w


# ----------------------------------------------------------------------------- model

class CAVP(nn.Module):
    """CAVP segmentation network (Sec. 4.1). In train mode use batches of >= 2 (ASPP's image-pool BatchNorm).

    backbone: torchvision ResNet of the image branch, dilated to output_stride 8 (paper, official) or 16.
        Deviation: the official ResNet-50 has a deep (three 3x3 conv) stem; we keep torchvision's 7x7 stem so that
        torchvision's ImageNet weights load.
    audio_channels: 2 = stereo (one log-mel per channel), 1 = mono.
    audio_backbone: 'resnet18' (VPO, App. B.1) | 'resnet10' (CPU preset) | 'vggish' (AVSBench; freeze_audio as
        AVSBench).
    attn: f_CA activation, one of ATTN.   heads, dim: f_CA heads and width; dim = ASPP width + 48.
    weights, audio_weights: None (random init) | 'imagenet' (torchvision's file via the torch hub cache, fetched once)
        | 'vggish' (audio, the torchvggish release, likewise) | path of a state dict.
    """

    def __init__(self, *, num_classes=22, backbone='resnet50', output_stride=8, audio_channels=2,
                 audio_backbone='resnet18', attn='sigmoid', heads=4, dim=304, weights=None, audio_weights=None,
                 freeze_audio=False):
        super().__init__()
        if backbone not in IMAGE_BACKBONES:
            raise ValueError(f'backbone={backbone!r}: expected one of {IMAGE_BACKBONES}')
        if output_stride not in (8, 16):
            raise ValueError(f'output_stride={output_stride}: expected 8 or 16')
        if attn not in ATTN:
            raise ValueError(f'attn={attn!r}: expected one of {ATTN}')
        low_ch, aspp_ch = widths(dim)
        if low_ch < 1 or dim % heads:
            raise ValueError(f'dim={dim}: must be >= 7 and divisible by heads={heads}')
        # Image branch f_phi: ResNet + DeepLabV3+ encoder-decoder up to the fusion point.
        self.backbone = resnet_trunk(backbone, output_stride=output_stride)
        load_weights(self.backbone, weights, arch=backbone, arg='weights')
        expansion = self.backbone.layer1[0].expansion   # 1 for BasicBlock (resnet18/34), 4 for Bottleneck
        low, high = 64 * expansion, 512 * expansion     # layer1 and layer4 output channels
        # ASPP rates 6/12/18 at OS 8, as official (DeepLabV3+ uses 12/24/36 at OS 8, 6/12/18 at OS 16). At OS 16 we
        # halve them to 3/6/9 so that the field of view in input pixels equals the official OS-8 model, and so that
        # the small CPU crops (128-192 -> 8-12 px at OS 16) do not turn the rate-18 branch into a 1x1 conv.
        rates = [r * 8 // output_stride for r in (6, 12, 18)]
        self.aspp = ASPP(high, rates, aspp_ch)
        # torchvision's ASPP ends in Dropout(0.5); the official ASPP has none, and here it would zero 256 of u_v's 304
        # channels in training right before f_CA and the contrastive features z
        self.aspp.project[-1] = nn.Identity()
        self.reduce = nn.Sequential(nn.Conv2d(low, low_ch, 1, bias=False), nn.BatchNorm2d(low_ch),
                                    nn.ReLU(inplace=True))
        # Audio branch f_gamma. One token per clip, as official: a VPO clip is a static 3 s scene over a still
        # image, so there is no time to align with; one token also keeps f_CA's per-pixel cost tiny (CrossAttention).
        if audio_backbone == 'vggish':   # AVSBench (App. B.1, following [63]): (B, 1, 96, 64) -> (B, 128)
            if audio_channels != 1:
                raise ValueError('audio_backbone=vggish takes mono audio: audio_channels must be 1')
            self.audio = VGGish(weights=audio_weights, freeze=freeze_audio)
        elif audio_backbone in AUDIO_BACKBONES:   # resnet18 / resnet10
            self.audio = AudioResNet(channels=audio_channels, weights=audio_weights, arch=audio_backbone)
        else:
            raise ValueError(f"audio_backbone={audio_backbone!r}: expected one of {AUDIO_BACKBONES}")
        self.audio_proj = nn.Linear(self.audio.out_dim, dim)
        self.fusion = CrossAttention(dim=dim, heads=heads, attn=attn)
        # DeepLabV3+ head: two 3x3 fusing convs + a 1x1 classifier over C classes (background included).
        self.head = nn.Sequential(
            nn.Conv2d(dim, aspp_ch, 3, padding=1, bias=False), nn.BatchNorm2d(aspp_ch), nn.ReLU(inplace=True),
            nn.Conv2d(aspp_ch, aspp_ch, 3, padding=1, bias=False), nn.BatchNorm2d(aspp_ch),
            nn.ReLU(inplace=True), nn.Conv2d(aspp_ch, num_classes, 1))

    def forward_image(self, x):
        """x (B, 3, H, W), ImageNet-normalised -> {'u_v': (B, D, H/4, W/4), 'size': (H, W)}. Run once per image."""
        b = self.backbone
        low = b.layer1(stem(b, x))                                  # B, C1, H/4, W/4
        high = self.aspp(b.layer4(b.layer3(b.layer2(low))))         # B, D-48, H/os, W/os
        high = F.interpolate(high, size=low.shape[-2:], mode='bilinear', align_corners=False)  # B, D-48, H/4, W/4
        return {'u_v': torch.cat([high, self.reduce(low)], 1), 'size': tuple(x.shape[-2:])}   # u_v: B, D, H/4, W/4

    def forward_audio(self, a):
        """a (B, A, T, F) log-mel -> u_a (B, D), the single audio token."""
        return self.audio_proj(self.audio(a))

    def fuse(self, u_v, u_a):
        """f_CA (Sec. 4.1): u_v (B, D, h, w), u_a (B, D) -> z (B, D, h, w), attn (B, heads, h, w).
        z has channels-last strides (it is LayerNorm's output over pixel tokens): use reshape, not view."""
        if u_v.shape[0] != u_a.shape[0]:
            raise ValueError(f'fuse: u_v has batch {u_v.shape[0]} but u_a has {u_a.shape[0]}')
        return self.fusion(u_v, u_a)

    def classify(self, z, size):
        """z (B, D, h, w) -> logits (B, C, *size), bilinearly upsampled."""
        return F.interpolate(self.head(z), size=size, mode='bilinear', align_corners=False)

    def forward(self, x, a):
        """x (B, 3, H, W), a (B, A, T, F) -> dict(logits (B, C, H, W), z (B, D, H/4, W/4), attn (B, heads, H/4, W/4))"""
        u_v = self.forward_image(x)['u_v']   # 1. image branch u_v = f_phi(x)          B, D, H/4, W/4
        u_a = self.forward_audio(a)          # 2. audio branch u_a = f_gamma(a)        B, D
        z, attn = self.fuse(u_v, u_a)        # 3. z = f_CA(u_v, u_a) (Sec. 4.1)        B, D, H/4, W/4
        return dict(logits=self.classify(z, x.shape[-2:]), z=z, attn=attn)  # 4. per-pixel classes   B, C, H, W


# ----------------------------------------------------------------------------- CLI: parameters and timing

def param_counts(model):
    """Millions of parameters per branch."""
    groups = {'image backbone': [model.backbone], 'decoder (ASPP + layer1 reduce)': [model.aspp, model.reduce],
              'audio (ResNet or VGGish + Linear)': [model.audio, model.audio_proj], 'fusion f_CA': [model.fusion],
              'head': [model.head]}
    return {k: sum(p.numel() for m in ms for p in m.parameters()) / 1e6 for k, ms in groups.items()}


def time_forward(model, x, a, *, repeat, warmup):
    """Median milliseconds of: the image branch alone, the image branch + f_CA (u_a precomputed), f_CA alone,
    the audio branch and the full forward. bf16 autocast on CUDA."""
    cuda = x.device.type == 'cuda'
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):
        u_v, u_a = model.forward_image(x)['u_v'], model.forward_audio(a)
        jobs = {'image': lambda: model.classify(model.forward_image(x)['u_v'], x.shape[-2:]),
                'image+f_CA': lambda: model.classify(model.fuse(model.forward_image(x)['u_v'], u_a)[0], x.shape[-2:]),
                'f_CA': lambda: model.fuse(u_v, u_a), 'audio': lambda: model.forward_audio(a),
                'full': lambda: model(x, a)}
        times = {k: [] for k in jobs}
        for i in range(warmup + repeat):
            for k, job in jobs.items():  # interleaved, so that load from other processes hits every job alike
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                job()
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description='CAVP parameter counts and forward time: image branch alone vs fused.')
    p.add_argument('--backbone', default='resnet50', choices=IMAGE_BACKBONES, help='image backbone')
    p.add_argument('--output-stride', type=int, default=8, choices=(8, 16), help='image backbone output stride')
    p.add_argument('--attn', default='sigmoid', choices=ATTN, help='f_CA activation (Fig. 6, Table 5)')
    p.add_argument('--size', type=int, default=None, help='square image side; default 512 (paper crops) on CUDA, '
                   '256 on a CPU (512 takes minutes there)')
    p.add_argument('--audio-seconds', type=float, default=3.0, help='clip length; 100 log-mel frames per second')
    p.add_argument('--audio-channels', type=int, default=2, choices=(1, 2), help='2 = stereo, 1 = mono')
    p.add_argument('--batch', type=int, default=None, help="batch of the timed forward; default the paper's 16 on "
                   'CUDA, 1 on a CPU')
    p.add_argument('--repeat', type=int, default=None, help='timed repeats (median reported); default 10 on CUDA, 3 on '
                   'a CPU')
    p.add_argument('--warmup', type=int, default=None, help='untimed warm-up rounds; default 3 on CUDA, 1 on a CPU')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cpu (fp32) or cuda (bf16 autocast + channels_last)')
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == 'cuda'
    args.size = args.size or (512 if cuda else 256)
    args.batch = args.batch or (16 if cuda else 1)
    args.repeat = args.repeat or (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)

    torch.manual_seed(0)
    model = CAVP(backbone=args.backbone, output_stride=args.output_stride, attn=args.attn,
                 audio_channels=args.audio_channels).eval().to(dev)
    counts = param_counts(model)
    for k, v in counts.items():
        print(f'{k:32s} {v:8.2f} M')
    print(f'{"total":32s} {sum(counts.values()):8.2f} M', flush=True)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    a = torch.randn(args.batch, args.audio_channels, round(100 * args.audio_seconds), 64, device=dev)
    if cuda:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    ms = time_forward(model, x, a, repeat=args.repeat, warmup=args.warmup)
    print(f'{args.device}, {args.backbone} OS {args.output_stride}, {args.size}x{args.size}, audio {tuple(a.shape)}, '
          f'batch {args.batch}, attn {args.attn}, median of {args.repeat} after {args.warmup} warm-up'
          f'{"" if cuda else " (CPU defaults: --size 256 --batch 1 --repeat 3 --warmup 1)"}:')
    for k, what in (('image', 'image branch (backbone+decoder+head)'), ('image+f_CA', 'image branch + f_CA'),
                    ('f_CA', 'f_CA alone'), ('audio', 'audio branch'), ('full', 'full forward (image+audio+f_CA)')):
        print(f'  {what:38s} {ms[k]:9.1f} ms')
    print(f'fusion overhead: f_CA alone = {100 * ms["f_CA"] / ms["image"]:.1f} % of the image branch; '
          f'image+f_CA vs image: {100 * (ms["image+f_CA"] / ms["image"] - 1):+.1f} %; '
          f'full vs image (audio branch included): {100 * (ms["full"] / ms["image"] - 1):+.1f} %')


if __name__ == '__main__':
    main()
