"""VPO: Visual Post-production benchmark synthesis (paper Sec. 3, App. A, Fig. 3, Fig. 9, Table 7).

COCO images and instance masks are paired with VGGSound clips of the same class (Table 7). Three subsets:
VPO-SS (one sounding object), VPO-MS (up to 5 sounding objects of different classes), VPO-MSMI (several
instances of one class; stereo says which one sounds). No official script builds VPO; this is ours.

Person rule (COCO has only 'person'; the paper's male/female/baby split was made offline and not released).
An image's persons get one class, decided from its COCO captions (`annotations/captions_{train,val}2017.json`):
a caption mentions 'male' (man, men, boy, guy, gentleman, he, his, ...), 'female' (woman, girl, lady, she,
her, ...) or 'baby' (baby, infant, toddler, newborn; not 'baby elephant' etc.). If at least 2 captions mention
exactly one group and no caption mentions another, every person of the image gets that class. Otherwise
(mixed or no mentions, or no captions file) the persons are undecided and painted 255 = ignore: telling the
model that a person is background would contradict the male/female/baby classes it must learn.

Selection decisions (ours, where the paper is silent); images sorted by id, randomness from `seed`:
- Sounding candidates have area >= MIN_AREA (COCO's 'small' bound, 32^2 px) and a class with audio.
- SS: one row per (image, sounding annotation); the sounding class has exactly one instance in the image
  (same-class ambiguity is MSMI's job). Sec. 3 priority: every candidate of a multi-class image is taken; then
  images holding a single object fill each class up to the median per-class count of the multi-class rows.
- MS: images whose VPO objects are all of different classes, with no crowd region of a VPO class and >= 2
  candidates. N <= 2 candidates: all sound; N > 2: a uniform number in [2, min(N-1, 5)] sounds (Sec. 3).
- MSMI: images with a class c of >= 2 candidates (one chosen at random if several). 1 (2 candidates) or 1-2
  (3+ candidates) instances of c sound, each at least ALPHA_GAP (bbox-estimated) away from every silent c;
  other single-instance classes sound with p = 0.5; at most 5 sources. Every MSMI row is multi-instance
  (the official MSMI csv also carries MS images, flagged multi_instance = 0).
- Splits by image: test = val2017; val = `val_frac` of train2017 by a seeded hash of the image id.
- Audio pools: per class, VGGSound's own train/test split when `vggsound.csv` is given, else the 20% of clips
  with the smallest hash of their file name are test clips, so no clip is in train and test (val uses
  train clips). Clips are dealt from a seeded, shuffled per-class deck: all are used before any repeats.
"""
import argparse, csv, hashlib, json, math, multiprocessing, os, re, resource, tempfile, time
from collections import Counter, defaultdict, namedtuple

import numpy as np
from PIL import Image
from pycocotools import mask as maskutils
from tqdm import tqdm

VERSION = 1
VPO_CLASSES = ['background', 'airplane', 'baby', 'bird', 'bus', 'car', 'cat', 'cell phone', 'cow', 'dog',
               'elephant', 'female', 'horse', 'keyboard', 'male', 'motorcycle', 'mouse', 'sheep',
               'skateboard', 'sports ball', 'tennis racket', 'zebra']   # index == label value; C = 22
CLS_INDEX = {c: i for i, c in enumerate(VPO_CLASSES)}
TABLE7 = {  # Table 7: visual label -> VGGSound labels ('cat caterwaulin' in the paper's text is cut short)
    'bird': ['mynah bird singing'], 'keyboard': ['typing on computer keyboard'], 'bus': ['driving buses'],
    'cat': ['cat purring', 'cat meowing', 'cat caterwauling'],
    'dog': ['dog growling', 'dog bow-wow', 'dog whimpering', 'dog howling', 'dog barking', 'dog baying'],
    'horse': ['horse neighing', 'horse clip-clop'],
    'car': ['car passing by', 'car engine idling', 'car engine starting', 'race car, auto racing',
            'car engine knocking'],
    'sports ball': ['shot football'], 'airplane': ['airplane', 'airplane flyby'], 'sheep': ['sheep bleating'],
    'cow': ['cow lowing'], 'motorcycle': ['driving motorcycle'], 'mouse': ['mouse clicking'],
    'cell phone': ['cell phone buzzing'], 'elephant': ['elephant trumpeting'], 'zebra': ['zebra braying'],
    'tennis racket': ['playing tennis'], 'skateboard': ['skateboarding'],
    'male': ['male speech, man speaking', 'male singing'], 'female': ['female speech, woman speaking'],
    'baby': ['baby babbling', 'baby crying', 'baby laughter']}
LABEL_TO_CLASS = {label: cls for cls, labels in TABLE7.items() for label in labels}
COCO_IDS = {'airplane': 5, 'baby': 1, 'bird': 16, 'bus': 6, 'car': 3, 'cat': 17, 'cell phone': 77, 'cow': 21,
            'dog': 18, 'elephant': 22, 'female': 1, 'horse': 19, 'keyboard': 76, 'male': 1, 'motorcycle': 4,
            'mouse': 74, 'sheep': 20, 'skateboard': 41, 'sports ball': 37, 'tennis racket': 43, 'zebra': 24}
OFFICIAL_IDS = {**COCO_IDS, 'male': 92, 'female': 93, 'baby': 94}   # ids in the released masks
OFFICIAL_LUT = np.full(256, 255, np.uint8)   # released mask id -> our index (unknown ids -> ignore)
OFFICIAL_LUT[0] = 0
for _c, _i in OFFICIAL_IDS.items():
    OFFICIAL_LUT[_i] = CLS_INDEX[_c]
POLYGONS = re.compile(rb'"segmentation":\s*\[\s*\[[^\]]*\](?:\s*,\s*\[[^\]]*\])*\s*\]')   # [[x, y, ...], ...]
AUDIO_EXTS = ('wav', 'flac', 'ogg', 'opus')
SUBSETS, SPLITS = ('ss', 'ms', 'msmi'), ('train', 'val', 'test')
MIN_AREA, ALPHA_GAP, MAX_SOURCES, AUDIO_TEST_FRAC = 32 * 32, 0.1, 5, 0.2
PERSON_WORDS = {w: group for group, words in (
    ('male', 'man men boy boys guy guys gentleman gentlemen male males he his him'),
    ('female', 'woman women girl girls lady ladies female females she her hers'),
    ('baby', 'baby babies infant infants toddler toddlers newborn')) for w in words.split()}
ANIMALS = set('elephant giraffe zebra bird cow calf sheep lamb horse goat bear cat kitten dog puppy puppie '
              'animal duck deer'.split())   # 'baby elephant' is not a baby (a trailing 's' is stripped first)

Obj = namedtuple('Obj', 'ann_id cls area cx ann')              # cx: bbox centre / W (selection-time alpha)
Img = namedtuple('Img', 'image_id path h w objs ignore crowd')  # objs by ann_id; ignore: anns painted 255


def folder_name(label):
    """VGGSound label -> folder name: each run of non-alphanumerics -> '_' ('dog bow-wow' -> 'dog_bow_wow')."""
    return re.sub(r'[^0-9A-Za-z]+', '_', label).strip('_')


def _unit(*key):
    """Deterministic number in [0, 1) from a key (stable across runs and machines, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), 'big') / 2 ** 64


# ---------------------------------------------------------------- stereo (Sec. 3, Fig. 3)
def pan(w, alpha, *, sr=16000, itd=False):
    """Mono (L,) -> stereo (2, L) float32: L = (1 - alpha) * w, R = alpha * w (Sec. 3).

    alpha = c_w / W: 0 = left image edge (left channel loud), 1 = right edge. With `itd` the far ear also hears
    the source late (the paper's stated limitation): azimuth theta = (alpha - 1/2) * pi, Woodworth delay
    (r / c) * (|theta| + sin|theta|) with head radius r = 8.75 cm, c = 343 m/s (max 0.66 ms = 10.5 samples
    at 16 kHz), rounded to whole samples."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f'alpha must be in [0, 1], got {alpha}')
    w = np.asarray(w, np.float32)
    out = np.stack([(1.0 - alpha) * w, alpha * w])   # 2, L
    theta = abs(alpha - 0.5) * math.pi
    d = min(len(w), int(round(sr * 0.0875 / 343.0 * (theta + math.sin(theta))))) if itd else 0
    if d:
        far = 1 if alpha < 0.5 else 0                 # source on the left -> right ear is far
        out[far] = np.concatenate([np.zeros(d, np.float32), out[far, :-d]])
    return out


def mix(stereos):
    """Sum stereo waves (each (2, L)), then divide by the peak if it exceeds 1, so the mix cannot clip.

    A mix within [-1, 1] is left untouched, so a source keeps its level whatever else sounds (dividing by the
    number of sources would not); the official code sums with no normalisation and can clip."""
    s = np.sum(np.stack([np.asarray(x, np.float32) for x in stereos]), axis=0)   # N, 2, L -> 2, L
    return s / max(1.0, float(np.abs(s).max(initial=0.0)))


# ---------------------------------------------------------------- inputs: captions, audio, COCO
def _person_groups(caption):
    words = re.findall(r'[a-z]+', caption.lower())
    return {PERSON_WORDS[w] for i, w in enumerate(words) if w in PERSON_WORDS and not (
        PERSON_WORDS[w] == 'baby' and i + 1 < len(words) and words[i + 1].rstrip('s') in ANIMALS)}


def person_classes(captions_file, image_ids):
    """{image_id: 'male'|'female'|'baby'} for the images whose captions decide it (module docstring)."""
    if not os.path.isfile(captions_file):
        return {}
    with open(captions_file) as f:
        caps = json.load(f)['annotations']
    votes = defaultdict(Counter)
    for c in caps:
        if c['image_id'] in image_ids:
            votes[c['image_id']].update(_person_groups(c['caption']))
    return {i: next(iter(v)) for i, v in votes.items() if len(v) == 1 and max(v.values()) >= 2}


def find_audio(audio):
    """Clip pools {cls: {'train': [paths], 'test': [paths]}} and the classes whose pools had to be shared.

    `audio` holds `vggsound.csv` (ytid, start, label, split; clips `<ytid>_<start:06d>.<ext>` anywhere below)
    or one folder per VGGSound label, named by folder_name(label). Clips are listed, not decoded."""
    if not os.path.isdir(audio):
        raise FileNotFoundError(f'--audio {audio}: no such directory')
    pools = defaultdict(lambda: {'train': [], 'test': []})
    table = os.path.join(audio, 'vggsound.csv')
    if os.path.isfile(table):
        files = {}
        for d, _, names in sorted(os.walk(audio)):
            for n in sorted(names):
                stem, ext = os.path.splitext(n)
                if ext[1:].lower() in AUDIO_EXTS:
                    files.setdefault(stem, os.path.join(d, n))
        with open(table, newline='') as f:
            for line, r in enumerate(csv.reader(f), 1):
                if len(r) < 4:
                    raise ValueError(f'{table}:{line}: expected ytid,start,label,split, got {r}')
                cls = LABEL_TO_CLASS.get(r[2].strip())   # a header line, if any, has no Table 7 label
                stem = f'{r[0]}_{int(float(r[1])):06d}' if cls else None
                if stem in files:
                    pools[cls]['test' if r[3].strip() == 'test' else 'train'].append(files[stem])
    else:
        for label, cls in LABEL_TO_CLASS.items():
            d = os.path.join(audio, folder_name(label))
            pools[cls]['train'] += [os.path.join(d, n) for n in (os.listdir(d) if os.path.isdir(d) else ())
                                    if n.rsplit('.', 1)[-1].lower() in AUDIO_EXTS]
        for p in pools.values():   # ranked, so that a class with >= 2 clips always has test clips
            ranked = sorted(p['train'], key=lambda q: (_unit('audio', os.path.basename(q)), q))
            k = max(1, round(AUDIO_TEST_FRAC * len(ranked))) if len(ranked) > 1 else 0
            p['test'], p['train'] = ranked[:k], ranked[k:]
    pools = {c: p for c, p in pools.items() if p['train'] or p['test']}
    if not pools:
        raise ValueError(f'--audio {audio}: no clips found; expected vggsound.csv or per-label folders such as '
                         f'{folder_name(TABLE7["dog"][4])}/ with {"/".join(AUDIO_EXTS)} files')
    shared = sorted(c for c, p in pools.items() if not (p['train'] and p['test']))
    for c in shared:   # too few clips to keep train and test apart: better than dropping the class
        p = pools[c]
        p['train'], p['test'] = p['train'] or p['test'], p['test'] or p['train']
    return {c: {k: sorted(v) for k, v in pools[c].items()} for c in sorted(pools)}, shared


def _instances(coco, name):
    path = os.path.join(coco, 'annotations', f'instances_{name}2017.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: COCO instances file not found (--coco must hold the COCO 2017 layout)')
    return path


def load_split(coco, name):
    """COCO `instances_{name}2017.json` -> [Img] holding VPO-class objects, sorted by image id.

    Polygons are ~75% of the file and selection needs none of them: they are cut out of the raw text (each
    becomes 0) before parsing, 4x faster and a fraction of the memory; attach_polygons() reads the chosen ones."""
    with open(_instances(coco, name), 'rb') as f:
        data = json.loads(POLYGONS.sub(b'"segmentation": 0', f.read()))
    names = {c['id']: c['name'] for c in data['categories']}
    keep = {i for i, n in names.items() if n in CLS_INDEX or n == 'person'}
    by_image = defaultdict(list)
    for a in data['annotations']:
        if a['category_id'] in keep:
            by_image[a['image_id']].append(a)
    with_person = {i for i, anns in by_image.items() if any(names[a['category_id']] == 'person' for a in anns)}
    persons = person_classes(os.path.join(coco, 'annotations', f'captions_{name}2017.json'), with_person)
    images = []
    for im in sorted(data['images'], key=lambda im: im['id']):
        objs, ignore, crowd = [], [], False
        for a in sorted(by_image.get(im['id'], ()), key=lambda a: a['id']):
            cls = names[a['category_id']]
            cls = persons.get(im['id']) if cls == 'person' else cls
            if cls is None or a.get('iscrowd', 0):
                ignore.append(a)
                crowd |= bool(a.get('iscrowd', 0))
            else:
                objs.append(Obj(a['id'], cls, a['area'], (a['bbox'][0] + a['bbox'][2] / 2) / im['width'], a))
        if objs:
            images.append(Img(im['id'], os.path.join(coco, f'{name}2017', im['file_name']), im['height'],
                              im['width'], objs, ignore, crowd))
    return images


# ---------------------------------------------------------------- selection (Sec. 3, App. A.2, Fig. 9)
def _ss(images, ok, rng):
    multi, single = [], defaultdict(list)
    for im in images:
        n = Counter(o.cls for o in im.objs)
        for o in im.objs:
            if n[o.cls] == 1 and ok(o) and len(n) > 1:
                multi.append((im, o))
            elif n[o.cls] == 1 and ok(o):
                single[o.cls].append((im, o))
    got = Counter(o.cls for _, o in multi)   # Sec. 3: multi-class images first, single ones fill up to the median
    target = max(1, int(np.median([got[c] for c in set(got) | set(single)] or [0])))
    chosen = multi + [pairs[i] for c, pairs in sorted(single.items())
                      for i in sorted(rng.permutation(len(pairs))[:max(0, target - got[c])])]
    chosen.sort(key=lambda p: (p[0].image_id, p[1].ann_id))
    return [(im, {o.ann_id}) for im, o in chosen]


def _ms(images, ok, rng):
    rows = []
    for im in images:
        cand = [o for o in im.objs if ok(o)]
        if im.crowd or len(cand) < 2 or max(Counter(o.cls for o in im.objs).values()) > 1:
            continue   # Sec. 3: no multi-instance images in MS
        k = len(cand) if len(cand) <= 2 else int(rng.integers(2, min(len(cand) - 1, MAX_SOURCES) + 1))
        rows.append((im, {cand[i].ann_id for i in rng.choice(len(cand), k, replace=False)}))
    return rows


def _msmi(images, ok, rng):
    rows = []
    for im in images:
        by_cls = defaultdict(list)
        for o in im.objs:
            by_cls[o.cls].append(o)
        multi = sorted(c for c, objs in by_cls.items() if sum(map(ok, objs)) >= 2)
        if not multi:
            continue
        c = multi[int(rng.integers(len(multi)))]
        cand = [o for o in by_cls[c] if ok(o)]
        want = 1 if len(cand) == 2 else int(rng.integers(1, 3))   # >= 1 silent instance of c stays
        loud = set()
        for i in rng.permutation(len(cand)):   # stereo must tell a loud c from every silent c
            o = cand[i]
            if len(loud) < want and all(abs(o.cx - p.cx) >= ALPHA_GAP for p in by_cls[c]
                                        if p.ann_id != o.ann_id and p.ann_id not in loud):
                loud.add(o.ann_id)
        if not loud:
            continue
        others = [o.ann_id for o in im.objs if len(by_cls[o.cls]) == 1 and ok(o) and rng.random() < 0.5]
        rows.append((im, loud | set(others[:MAX_SOURCES - len(loud)])))
    return rows


def _dealer(pools, pool, rng):
    """draw(cls) -> a clip path from a seeded, shuffled per-class deck: every clip is dealt before any repeats."""
    decks = {}

    def draw(cls):
        if cls not in pools:
            return None   # a class without audio never sounds; its silent objects get no clip
        if not decks.get(cls):
            clips = pools[cls][pool]
            decks[cls] = [clips[i] for i in rng.permutation(len(clips))]
        return decks[cls].pop()
    return draw


def select(coco, audio, *, seed=0, val_frac=0.15):
    """Read COCO + the audio listing and choose every sample: {(subset, split): [(Img, sounding ids, clips)]}.

    This is the step the issue bounds (2 min, 6 GiB at COCO scale); polygons are not read (attach_polygons)."""
    if not os.path.isdir(coco):
        raise FileNotFoundError(f'--coco {coco}: no such directory')
    pools, shared = find_audio(audio)
    images = {'train': [], 'val': [], 'test': load_split(coco, 'val')}   # test = COCO val2017
    train = load_split(coco, 'train')
    both = {im.image_id for im in images['test']} & {im.image_id for im in train}
    if both:   # inst/<image_id>.png and the split-by-image rule need ids unique across the two files
        raise ValueError(f'{coco}/annotations: image ids {sorted(both)[:5]} are in both train2017 and val2017')
    for im in train:
        images['val' if _unit('split', seed, im.image_id) < val_frac else 'train'].append(im)
    plan = {}
    for si, (subset, pick) in enumerate(zip(SUBSETS, (_ss, _ms, _msmi))):
        for pi, split in enumerate(SPLITS):
            pool = 'test' if split == 'test' else 'train'
            rows = pick(images[split], lambda o: o.area >= MIN_AREA and o.cls in pools,
                        np.random.default_rng([seed, si, pi]))
            draw = _dealer(pools, pool, np.random.default_rng([seed, si, pi, 1]))
            plan[subset, split] = [(im, loud, [draw(o.cls) for o in im.objs]) for im, loud in rows]
    return plan, pools, shared


# ---------------------------------------------------------------- writing
def attach_polygons(coco, plan):
    """Put the polygons that load_split() cut out back into the annotations of the chosen images."""
    for name, splits in (('train', ('train', 'val')), ('val', ('test',))):
        need = {a['id']: a for (_, split), rows in plan.items() if split in splits for im, _, _ in rows
                for a in [o.ann for o in im.objs] + im.ignore if not isinstance(a['segmentation'], dict)}
        if need:
            with open(_instances(coco, name)) as f:
                for a in json.load(f)['annotations']:
                    if a['id'] in need:
                        need[a['id']]['segmentation'] = a['segmentation']


def _decode(seg, h, w):   # polygons, uncompressed and compressed RLE -> H, W bool
    if not seg:
        return np.zeros((h, w), bool)   # a degenerate annotation: no pixels
    if isinstance(seg, list):
        rle = maskutils.merge(maskutils.frPyObjects(seg, h, w))
    elif isinstance(seg.get('counts'), list):
        rle = maskutils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return maskutils.decode(rle).astype(bool)   # H, W


def _write_image(task):
    """Paint one image's instance map, write it and the label masks of its rows; return {ann_id: (alpha, area)}."""
    im, inst_path, masks = task
    if len(im.objs) > 254:
        raise ValueError(f'image {im.image_id}: {len(im.objs)} objects do not fit a uint8 instance map')
    inst = np.zeros((im.h, im.w), np.uint8)   # H, W
    for a in im.ignore:   # crowd / undecided persons first: any object painted later wins
        inst[_decode(a['segmentation'], im.h, im.w)] = 255
    stats, dec = {}, []
    for k, o in enumerate(im.objs, 1):   # Sec. 3: alpha = c_w / W, centre of mass of the whole mask (pixel j: j + 0.5)
        m = _decode(o.ann['segmentation'], im.h, im.w)
        area = int(m.sum())
        alpha = float(m.sum(0) @ (np.arange(im.w) + 0.5)) / area / im.w if area else o.cx
        stats[o.ann_id] = (round(min(max(alpha, 0.0), 1.0), 4), area)
        dec.append((-area, o.ann_id, k, m))
    for _, _, k, m in sorted(dec, key=lambda t: t[:2]):   # larger first, so small objects on top stay visible
        inst[m] = k
    Image.fromarray(inst).save(inst_path, compress_level=1)   # level 1: 2x faster to write than 6, nearly as small
    for path, pairs in masks:
        lut = np.zeros(256, np.uint8)   # lookup table: no in-place remap (official bug: car -> airplane)
        lut[255] = 255
        lut[[k for k, _ in pairs]] = [i for _, i in pairs]
        Image.fromarray(lut[inst]).save(path, compress_level=1)
    return im.image_id, stats


def _write_manifests(out, manifests, meta, progress):
    """Write `{subset}/{split}.jsonl`, meta.json and summary.json; print the summary."""
    for (name, split), rows in manifests.items():
        with open(os.path.join(out, name, f'{split}.jsonl'), 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows)
    summary = summarise(manifests)
    for fname, obj in (('meta.json', meta), ('summary.json', summary)):
        with open(os.path.join(out, fname), 'w') as f:
            json.dump(obj, f, indent=1)
    if progress:
        print_summary(summary)
    return summary


def build(coco, audio, out, *, seed=0, itd=False, val_frac=0.15, workers=min(4, os.cpu_count() or 1),
          progress=True):
    """Build VPO-SS/MS/MSMI under `out` in the layout of SPEC.md; return the summary (App. A.1)."""
    t0 = time.perf_counter()
    plan, pools, shared = select(coco, audio, seed=seed, val_frac=val_frac)
    if progress:
        print(f'selection: {time.perf_counter() - t0:.1f} s; classes without audio: '
              f'{[c for c in VPO_CLASSES[1:] if c not in pools]}; shared train/test audio: {shared}')
    attach_polygons(coco, plan)
    tasks = {}   # image_id -> (Img, inst path, [(mask path, [(k, class index)])])
    for (subset, split), rows in plan.items():
        os.makedirs(os.path.join(out, f'vpo_{subset}', 'masks', split), exist_ok=True)
        for n, (im, loud, _) in enumerate(rows):
            t = tasks.setdefault(im.image_id, (im, os.path.join(out, 'inst', f'{im.image_id}.png'), []))
            t[2].append((os.path.join(out, f'vpo_{subset}', 'masks', split, f'{n:06d}.png'),
                         [(k + 1, CLS_INDEX[o.cls]) for k, o in enumerate(im.objs) if o.ann_id in loud]))
    os.makedirs(os.path.join(out, 'inst'), exist_ok=True)
    jobs = [tasks[i] for i in sorted(tasks)]
    bar = dict(total=len(jobs), desc='writing masks', disable=not progress)
    if workers > 1:
        with multiprocessing.Pool(workers) as p:
            stats = dict(tqdm(p.imap(_write_image, jobs, chunksize=16), **bar))
    else:
        stats = dict(tqdm(map(_write_image, jobs), **bar))
    rel = lambda p: os.path.relpath(p, out) if p else None
    manifests = {}
    for (subset, split), rows in plan.items():
        manifests[f'vpo_{subset}', split] = [{
            'id': f'vpo_{subset}/{split}/{n:06d}', 'image': rel(im.path), 'image_id': im.image_id,
            'height': im.h, 'width': im.w, 'mask': f'vpo_{subset}/masks/{split}/{n:06d}.png',
            'inst': f'inst/{im.image_id}.png',
            'objects': [{'cls': o.cls, 'ann_id': o.ann_id, 'alpha': stats[im.image_id][o.ann_id][0],
                         'area': stats[im.image_id][o.ann_id][1], 'sounding': o.ann_id in loud, 'clip': rel(c)}
                        for o, c in zip(im.objs, clips)]} for n, (im, loud, clips) in enumerate(rows)]
    meta = {'version': VERSION, 'seed': seed, 'itd': itd, 'classes': VPO_CLASSES, 'source': 'coco+vggsound',
            'val_frac': val_frac, 'min_area': MIN_AREA, 'alpha_gap': ALPHA_GAP, 'max_sources': MAX_SOURCES,
            'audio_clips': {c: {k: len(v) for k, v in p.items()} for c, p in pools.items()},
            'shared_audio': shared}
    return _write_manifests(out, manifests, meta, progress)


# ---------------------------------------------------------------- summary (App. A.1, Fig. 8)
def summarise(manifests):
    """Sounding objects per subset, split and class; imbalance ratio N_max / N_min over classes present."""
    summary = {}
    for (name, split), rows in manifests.items():
        s = summary.setdefault(name, {'samples': {}, 'classes': {c: {} for c in VPO_CLASSES[1:]}})
        s['samples'][split] = len(rows)
        for c, n in Counter(o['cls'] for r in rows for o in r['objects'] if o['sounding']).items():
            s['classes'][c][split] = n
    for s in summary.values():
        tot = {c: sum(v.values()) for c, v in s['classes'].items() if sum(v.values())}
        hi, lo = (max(tot, key=tot.get), min(tot, key=tot.get)) if tot else (None, None)
        s['imbalance'] = {'ratio': round(tot[hi] / tot[lo], 2) if tot else None, 'max': hi, 'min': lo,
                          'missing': [c for c in VPO_CLASSES[1:] if c not in tot]}
    return summary


def print_summary(summary):
    """Table of sounding objects per class (rows) and subset (columns: train/val/test), then samples."""
    names = list(summary)
    print(f'{"class":14s}' + ''.join(f'{n + " train/val/test":>26s}' for n in names))
    cell = lambda d: '/'.join(str(d.get(k, 0)) for k in SPLITS)
    for c in VPO_CLASSES[1:]:
        print(f'{c:14s}' + ''.join(f'{cell(summary[n]["classes"][c]):>26s}' for n in names))
    print(f'{"samples":14s}' + ''.join(f'{cell(summary[n]["samples"]):>26s}' for n in names))
    for n in names:
        i = summary[n]['imbalance']
        print(f'{n}: imbalance N_max/N_min = {i["ratio"]} ({i["max"]} / {i["min"]}); missing: {i["missing"]}')


# ---------------------------------------------------------------- official release (NOTES-official-code.md)
def _remap_official(src, dst):
    ids = np.asarray(Image.open(src).convert('L'))   # H, W: COCO ids + 92/93/94
    Image.fromarray(OFFICIAL_LUT[ids]).save(dst)      # lookup table, not the official in-place remap


def read_official(root, subset, split, *, audio=None, seed=0, val_frac=0.15, cache=None, progress=True):
    """Rows of our manifest format for `split` of the released `VPO-{SS,MS,MSMI}/vpo_*_data_stereo.csv`.

    Their 'val' split is their test set -> our 'test'; our 'val' is `val_frac` of their train images by the
    same seeded image hash as build(). Only sounding objects are known (no silent ones, no areas, no instance
    map: 'inst' is None). Paths are absolute; 'mask' is the released mask remapped by OFFICIAL_LUT to our
    class indices, written once into `cache` (default ROOT/cavp_masks, mirroring the release's file names)."""
    subset = subset.removeprefix('vpo_')
    if split not in SPLITS:
        raise ValueError(f'unknown split {split!r}; known: {SPLITS}')
    rows = _official_rows(root, subset, audio=audio, seed=seed, val_frac=val_frac)[split]
    cache = cache or os.path.join(root, 'cavp_masks')
    todo = []
    for r in rows:
        src, r['mask'] = r['mask'], os.path.join(cache, os.path.relpath(r['mask'], root))
        if not os.path.isfile(r['mask']):
            todo.append((src, r['mask']))
    for src, dst in tqdm(todo, desc=f'remapping vpo_{subset}/{split} masks', disable=not progress or not todo):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _remap_official(src, dst + '.tmp.png')
        os.replace(dst + '.tmp.png', dst)   # a crash never leaves a half-written mask behind
    return rows


def _official_rows(root, subset, *, audio=None, seed=0, val_frac=0.15):
    """{split: rows} of a released csv; SS: one row per line, MS/MSMI: lines grouped by image; raw masks."""
    base = os.path.join(root, f'VPO-{subset.upper()}')
    table = os.path.join(base, f'vpo_{subset}_data_stereo.csv')
    if not os.path.isfile(table):
        raise FileNotFoundError(f'{table}: released VPO csv not found (--official must hold VPO-{subset.upper()}/)')
    audio = os.path.join(audio or os.path.join(root, 'VGGSound'), 'audios')

    def find(folder, name, cate):   # released files are flat or in per-class folders, depending on the subset
        paths = [os.path.join(folder, name), os.path.join(folder, cate, name)]
        return next((p for p in paths if os.path.isfile(p)), paths[0])
    groups = {}
    with open(table, newline='') as f:
        for line, r in enumerate(csv.DictReader(f), 2):
            if r['cateName'] not in CLS_INDEX:
                raise ValueError(f'{table}:{line}: unknown class {r["cateName"]!r}; known: {VPO_CLASSES[1:]}')
            img, ann = int(r['img_Id']), int(float(r['ann_Ids']))
            key = (r['split'], img, ann, line) if subset == 'ss' else (r['split'], img)
            groups.setdefault(key, []).append((line, r))
    rows = {s: [] for s in SPLITS}
    for key, lines in groups.items():
        (line, r0), lines = lines[0], [r for _, r in lines]
        img = key[1]
        split = 'test' if key[0] in ('val', 'test') else 'val' if _unit('split', seed, img) < val_frac else 'train'
        folder = base if subset != 'msmi' or int(float(r0.get('multi_instance') or 1)) else \
            os.path.join(root, 'VPO-MS')   # MSMI lines with multi_instance = 0 live in VPO-MS
        name = f'{img:012d}_{key[2]:012d}.png' if subset == 'ss' else f'{img:012d}.png'
        mask = find(os.path.join(folder, 'mask'), name, r0['cateName'])
        if not os.path.isfile(mask):
            raise FileNotFoundError(f'{mask}: mask of {table}:{line} not found')
        with Image.open(mask) as m:
            width, height = m.size
        rows[split].append({
            'id': f'vpo_{subset}/{split}/{len(rows[split]):06d}', 'image': find(os.path.join(folder, 'data'), f'{img:012d}.jpg', r0['cateName']),
            'image_id': img, 'height': height, 'width': width, 'mask': mask, 'inst': None,
            'objects': [{'cls': r['cateName'], 'ann_id': int(float(r['ann_Ids'])), 'alpha': float(r['audio_pos']),
                         'area': None, 'sounding': True, 'clip': os.path.join(audio, r['vgg_file'] + '.wav')}
                        for r in lines]})
    return rows


def convert_official(root, out, *, audio=None, seed=0, val_frac=0.15, progress=True):
    """Turn the released VPO into our layout under `out` (masks remapped by OFFICIAL_LUT); return the summary."""
    found = [s for s in SUBSETS if os.path.isfile(os.path.join(root, f'VPO-{s.upper()}', f'vpo_{s}_data_stereo.csv'))]
    if not found:
        raise FileNotFoundError(f'--official {root}: no VPO-SS/MS/MSMI/vpo_*_data_stereo.csv found')
    manifests = {}
    for subset in found:
        for split, rows in _official_rows(root, subset, audio=audio, seed=seed, val_frac=val_frac).items():
            os.makedirs(os.path.join(out, f'vpo_{subset}', 'masks', split), exist_ok=True)
            for n, r in enumerate(tqdm(rows, desc=f'vpo_{subset}/{split}', disable=not progress)):
                src, r['mask'] = r['mask'], f'vpo_{subset}/masks/{split}/{n:06d}.png'
                _remap_official(src, os.path.join(out, r['mask']))
                r['image'] = os.path.relpath(r['image'], out)
                for o in r['objects']:
                    o['clip'] = os.path.relpath(o['clip'], out)
            manifests[f'vpo_{subset}', split] = rows
    meta = {'version': VERSION, 'seed': seed, 'itd': False, 'classes': VPO_CLASSES, 'source': 'official',
            'val_frac': val_frac}
    return _write_manifests(out, manifests, meta, progress)


# ---------------------------------------------------------------- selection benchmark (issue: 2 min, 6 GiB)
def _fake_coco(root, n_images, points, seed):
    """COCO-train2017-like files: 7.3 instances per image (860k / 118k), COCO's class frequencies (60 non-VPO
    classes lumped evenly), 3 theme classes per image, log-uniform areas, 1% crowd RLE, `points`-vertex polygons."""
    rng = np.random.default_rng(seed)
    freq = {'person': 262000, 'car': 44000, 'bird': 10800, 'sheep': 9500, 'motorcycle': 8700, 'cow': 8100,
            'horse': 6600, 'cell phone': 6400, 'sports ball': 6300, 'bus': 6100, 'skateboard': 5500,
            'elephant': 5500, 'dog': 5500, 'zebra': 5300, 'airplane': 5100, 'tennis racket': 4800, 'cat': 4800,
            'keyboard': 2900, 'mouse': 2300, **{f'other{i}': 7700 for i in range(60)}}
    cats = [{'id': COCO_IDS.get(n, 1 if n == 'person' else 100 + i), 'name': n} for i, n in enumerate(freq)]
    p = np.array(list(freq.values()), float) / sum(freq.values())
    crowd_rle = '{"size": [480, 640], "counts": "' + '1' * 200 + '"}'   # a string RLE, left in by POLYGONS
    os.makedirs(os.path.join(root, 'annotations'))
    for split, n, i0 in (('train', n_images, 1), ('val', max(1, n_images // 24), n_images + 1)):   # ids unique
        img = np.repeat(np.arange(i0, i0 + n), 1 + rng.poisson(6.3, n))                            # A
        cat = rng.choice(len(cats), (n, 3), p=p)[img - i0, np.minimum(rng.geometric(0.6, len(img)) - 1, 2)]
        side = np.exp(rng.uniform(np.log(5), np.log(400), len(img)))                               # sqrt(area)
        xy = rng.uniform(0, 1, (len(img), 2)) * (np.array([640, 480]) - side[:, None] / 2)         # A, 2
        poly = np.round(xy[:, None] + rng.uniform(0, 0.5, (len(img), points, 2)) * side[:, None, None], 2)  # A, P, 2
        crowd = rng.random(len(img)) < 0.01
        head = json.dumps({'categories': cats, 'images': [{'id': i, 'file_name': f'{i:012d}.jpg', 'height': 480,
                                                           'width': 640} for i in range(i0, i0 + n)]})
        with open(os.path.join(root, 'annotations', f'instances_{split}2017.json'), 'w') as f:
            f.write(head[:-1] + ', "annotations": [')
            f.writelines(f'{", " if a else ""}{{"id": {a + 1}, "image_id": {i}, "category_id": {cats[c]["id"]}, '
                         f'"iscrowd": {int(z)}, "area": {w * w / 4:.2f}, "bbox": [{u:.2f}, {v:.2f}, {w / 2:.2f}, '
                         f'{w / 2:.2f}], "segmentation": {crowd_rle if z else [pl]}}}' for a, (i, c, z, w, (u, v), pl)
                         in enumerate(zip(img.tolist(), cat.tolist(), crowd.tolist(), side.tolist(), xy.tolist(),
                                          poly.reshape(len(img), -1).tolist())))
            f.write(']}')
        words = np.array(['a man', 'a woman', 'a baby', 'people', 'a person'])[rng.integers(5, size=n)]
        with open(os.path.join(root, 'annotations', f'captions_{split}2017.json'), 'w') as f:
            f.write(json.dumps({'annotations': [{'image_id': i + i0, 'id': 5 * i + k, 'caption': f'{w} with a dog'}
                                                for i, w in enumerate(words.tolist()) for k in range(5)]}))
    for label in LABEL_TO_CLASS:   # listed, never decoded: empty files will do
        os.makedirs(os.path.join(root, 'audio', folder_name(label)))
        for k in range(5):
            open(os.path.join(root, 'audio', folder_name(label), f'clip{k}.wav'), 'w').close()


def _timed_select(coco, audio):
    t = time.perf_counter()
    plan, _, _ = select(coco, audio)
    use = resource.getrusage(resource.RUSAGE_SELF)   # CPU seconds too: wall time depends on the machine's load
    return time.perf_counter() - t, use.ru_utime + use.ru_stime, use.ru_maxrss / 2 ** 20, \
        {f'{a}/{b}': len(v) for (a, b), v in plan.items()}


def bench_selection(n_images, *, points=24, seed=0):
    """Generate a COCO-sized file in a temp dir, time select() in a fresh process; peak RSS (GiB) of that process."""
    ctx = multiprocessing.get_context('spawn')   # a child inherits its parent's peak RSS: keep this one small
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with ctx.Pool(1) as p:
            p.apply(_fake_coco, (tmp, n_images, points, seed))
        size = os.path.getsize(os.path.join(tmp, 'annotations', 'instances_train2017.json')) / 2 ** 20
        print(f'generated {n_images} images ({size:.0f} MiB json) in {time.perf_counter() - t:.0f} s')
        with ctx.Pool(1) as p:   # a fresh process: its peak RSS is selection's alone
            seconds, cpu, gib, counts = p.apply(_timed_select, (tmp, os.path.join(tmp, 'audio')))
    print(f'selection: {seconds:.1f} s wall, {cpu:.1f} s CPU, peak RSS {gib:.2f} GiB; load average '
          f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; samples: {counts}')
    return {'seconds': seconds, 'cpu_seconds': cpu, 'peak_gib': gib, 'json_mib': size, 'samples': counts}


def main():
    ap = argparse.ArgumentParser(description='Build the VPO benchmark (paper Sec. 3) or convert the released one.')
    # inputs
    ap.add_argument('--coco', default=None, help='COCO 2017 root: annotations/instances_{train,val}2017.json, '
                                                 'optional captions_*2017.json, train2017/, val2017/')
    ap.add_argument('--audio', default=None, help='VGGSound: per-label folders or vggsound.csv + clips; with '
                                                  '--official: the folder holding audios/ (default OFFICIAL/VGGSound)')
    ap.add_argument('--official', default=None, help='convert the released VPO (folder holding VPO-SS/MS/MSMI) instead')
    ap.add_argument('--out', default='data/vpo', help='output folder')
    # synthesis
    ap.add_argument('--seed', type=int, default=0, help='seed of splits, selection and clip pairing')
    ap.add_argument('--itd', action='store_true', default=False, help='record that loaders add an interaural delay')
    ap.add_argument('--val-frac', type=float, default=0.15, help='share of train2017 images in the val split')
    ap.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1), help='processes writing masks')
    # benchmark
    ap.add_argument('--bench-selection', type=int, default=0, metavar='N_IMAGES',
                    help='time selection on a generated COCO-sized file of N images (118287 = train2017) and exit')
    args = ap.parse_args()
    if args.bench_selection:
        bench_selection(args.bench_selection)
    elif args.official:
        convert_official(args.official, args.out, audio=args.audio, seed=args.seed, val_frac=args.val_frac)
    elif args.coco and args.audio:
        build(args.coco, args.audio, args.out, seed=args.seed, itd=args.itd, val_frac=args.val_frac,
              workers=args.workers)
    else:
        ap.error('give --coco and --audio, or --official, or --bench-selection')


if __name__ == '__main__':
    main()
