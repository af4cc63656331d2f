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

Checks at build time (VGGSound downloads hold missing and broken clips; a broken file would otherwise crash the
training step that first draws it). Every candidate clip's header is read; every image chosen is decoded in full
and must have its annotated size; every clip dealt is decoded in full and must not be silent (RMS below
SILENT_RMS, or below SILENT_REL times the median RMS of its class's decoded clips). What fails is left out and
the selection is redone without it. `summary.json` lists under 'skipped': unknown_audio_folders (folders that
are not Table 7 labels), missing_clips (vggsound.csv lines of a Table 7 label with no file), broken_clips,
silent_clips, broken_images ({path: why}), missing_captions ({captions file: persons painted ignore}) and
classes_without_audio ({class: objects that cannot sound}).

Output: build() writes into a sibling `<out>.partial-<pid>` renamed to `out` at the end; `out` must not exist or
be empty, so an interrupted or repeated build never mixes two builds' files.
"""
import argparse, contextlib, csv, hashlib, json, math, multiprocessing, os, re, resource, shutil, sys, tempfile, time
from collections import Counter, defaultdict, namedtuple

import numpy as np
import soundfile as sf
from PIL import Image
from pycocotools import mask as maskutils
from tqdm import tqdm

VERSION = 1
HERE = os.path.dirname(os.path.abspath(__file__))
OFFICIAL_CACHE = os.path.join(HERE, 'data', 'official')   # masks derived from a release (read_official)
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
SILENT_RMS, SILENT_REL = 1e-5, 0.01   # -100 dBFS; 40 dB under the class median: no sounding source
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
def read_json(path, text=None, *, keys=()):
    """Parse `text` (default: the file's bytes) as a JSON object holding `keys`; a bad file -> ValueError naming it.

    `text` is the file edited (polygons cut out): its error offsets are not the file's, so a failure re-parses
    the file itself for the position to report."""
    edited = text is not None
    if not edited:
        with open(path, 'rb') as f:
            text = f.read()
    try:
        data = json.loads(text)
    except ValueError as e:   # JSONDecodeError, UnicodeDecodeError
        if edited:
            return read_json(path, keys=keys)
        raise ValueError(f'{path}: not valid JSON (truncated?): {e}') from None
    missing = [k for k in keys if k not in data] if isinstance(data, dict) else list(keys)
    if missing:
        raise ValueError(f'{path}: no {missing} in this JSON; expected a COCO 2017 annotation file')
    return data


def inside(folder, *names, source):
    """folder/name/...: each name read from a manifest or a csv (`source`) must stay inside the folder it is
    relative to, so an absolute name, or `..` parts that climb out, raise ValueError."""
    path = folder
    for name in names:
        sub = os.path.join(path, name)
        rel = os.path.relpath(os.path.normpath(sub), os.path.normpath(path))
        if os.path.isabs(name) or rel == '..' or rel.startswith('..' + os.sep):
            raise ValueError(f'{source}: file name {name!r} is absolute or leaves {path}')
        path = sub
    return path


def id_array(img, path, what='mask', where=None):
    """(H, W) uint8 of the ids stored in an id PNG (label masks, instance maps, released masks): L as stored, P by
    its index values (not the brightness of their colours), 1 as 0/1, I / I;16 when every value fits 0..255.
    Colour modes (RGB, RGBA, ...) hold no ids: ValueError naming the file (and `where` it is listed)."""
    src = f' (from {where})' if where else ''
    if img.mode in ('L', 'P', '1') or img.mode == 'I' or img.mode.startswith('I;16'):
        a = np.array(img)
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f'{path}: {what} values {a.min()}..{a.max()} do not fit ids 0..255{src}')
        return a.astype(np.uint8)
    raise ValueError(f'{path}: {what} of mode {img.mode} holds colours, not ids; expected an L, P, 1 or I;16 PNG{src}')


def _person_groups(caption):
    words = re.findall(r'[a-z]+', caption.lower())
    return {PERSON_WORDS[w] for i, w in enumerate(words) if w in PERSON_WORDS and not (
        PERSON_WORDS[w] == 'baby' and i + 1 < len(words) and words[i + 1].rstrip('s') in ANIMALS)}


def person_classes(captions_file, image_ids):
    """{image_id: 'male'|'female'|'baby'} for the images whose captions decide it (module docstring)."""
    if not os.path.isfile(captions_file):
        return {}
    caps = read_json(captions_file, keys=('annotations',))['annotations']
    votes = defaultdict(Counter)
    for c in caps:
        if c['image_id'] in image_ids:
            votes[c['image_id']].update(_person_groups(c['caption']))
    return {i: next(iter(v)) for i, v in votes.items() if len(v) == 1 and max(v.values()) >= 2}


def _pmap(fn, items, workers):
    """[fn(x) for x in items], over `workers` processes when there are several items."""
    if workers > 1 and len(items) > 1:
        with multiprocessing.Pool(min(workers, len(items))) as p:
            return p.map(fn, items, chunksize=max(1, len(items) // (8 * workers)))
    return [fn(x) for x in items]


def _reason(e, path):
    """An exception's first line, without the path (the summary gives it already)."""
    return str(e).splitlines()[0].replace(repr(path), 'file').replace(path, 'file') if str(e) else type(e).__name__


def _clip_header(path):
    """Why a clip cannot be used, from its header alone; None if it can."""
    try:
        frames = sf.info(path).frames
    except Exception as e:   # soundfile raises several types; what a user needs is the reason
        return 'unreadable: ' + _reason(e, path)
    return None if frames > 0 else 'no samples'


def _clip_rms(path):
    """RMS of the whole clip decoded (all channels), or why it cannot be decoded (a str)."""
    total, n = 0.0, 0
    try:
        for block in sf.blocks(path, blocksize=1 << 16, dtype='float32', always_2d=True):   # T, channels
            if not np.isfinite(block).all():
                return 'non-finite samples'
            total, n = total + float(np.square(block, dtype=np.float64).sum()), n + block.size
    except Exception as e:   # soundfile raises several types
        return 'cannot decode: ' + _reason(e, path)
    return math.sqrt(total / n) if n else 'no samples'


def _image_problem(task):
    """Why an image cannot be used (fully decoded, size checked against its annotation); None if it can."""
    path, w, h = task
    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
    except Exception as e:   # PIL raises OSError, SyntaxError, ValueError... for broken files
        return 'cannot decode: ' + _reason(e, path)
    return None if size == (w, h) else f'{size[0]}x{size[1]} pixels, its annotations say {w}x{h}'


def _list_clips(audio):
    """Clips as listed: {cls: {'train': [...], 'test': [...]}} (folder layout: all in 'train', split later) and
    what was skipped: folders that are not Table 7 labels, vggsound.csv lines of a Table 7 label with no file."""
    pools = defaultdict(lambda: {'train': [], 'test': []})
    table = os.path.join(audio, 'vggsound.csv')
    if not os.path.isfile(table):
        known = {folder_name(label) for label in LABEL_TO_CLASS}
        unknown = sorted(d for d in os.listdir(audio) if d not in known and os.path.isdir(os.path.join(audio, d)))
        for label, cls in LABEL_TO_CLASS.items():
            d = os.path.join(audio, folder_name(label))
            pools[cls]['train'] += [os.path.join(d, n) for n in (os.listdir(d) if os.path.isdir(d) else ())
                                    if n.rsplit('.', 1)[-1].lower() in AUDIO_EXTS]
        return pools, {'unknown_audio_folders': unknown, 'missing_clips': 0}
    files = {}
    for d, _, names in sorted(os.walk(audio)):
        for n in sorted(names):
            stem, ext = os.path.splitext(n)
            if ext[1:].lower() in AUDIO_EXTS:
                files.setdefault(stem, os.path.join(d, n))
    missing = 0
    with open(table, newline='') as f:
        try:
            lines = list(csv.reader(f))
        except (UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f'{table}: not a text csv file: {e}') from None
    for line, r in enumerate(lines, 1):
        if len(r) < 4:
            raise ValueError(f'{table}:{line}: expected ytid,start,label,split, got {r} (truncated?)')
        cls = LABEL_TO_CLASS.get(r[2].strip())   # a header line, if any, has no Table 7 label
        if not cls:
            continue
        try:
            stem = f'{r[0]}_{int(float(r[1])):06d}'
        except (ValueError, OverflowError):
            raise ValueError(f'{table}:{line}: start {r[1]!r} is not a number') from None
        if stem in files:
            pools[cls]['test' if r[3].strip() == 'test' else 'train'].append(files[stem])
        else:
            missing += 1
    return pools, {'unknown_audio_folders': [], 'missing_clips': missing}


def _share(pools):
    """Classes with clips on one side only use them for train and test (better than dropping the class)."""
    shared = sorted(c for c, p in pools.items() if not (p['train'] and p['test']))
    for c in shared:
        p = pools[c]
        p['train'], p['test'] = p['train'] or p['test'], p['test'] or p['train']
    return shared


def find_audio(audio, *, workers=1):
    """Clip pools {cls: {'train': [paths], 'test': [paths]}}, the classes whose pools had to be shared, and what was
    skipped {'unknown_audio_folders', 'missing_clips', 'broken_clips': {path: why}} (module docstring).

    `audio` holds `vggsound.csv` (ytid, start, label, split; clips `<ytid>_<start:06d>.<ext>` anywhere below)
    or one folder per VGGSound label, named by folder_name(label). Every clip's header is read (soundfile, in
    `workers` processes): an unreadable or empty file is left out before the train/test split."""
    if not os.path.isdir(audio):
        raise FileNotFoundError(f'--audio {audio}: no such directory')
    listed, skipped = _list_clips(audio)
    clips = sorted({c for p in listed.values() for side in p.values() for c in side})
    why = dict(zip(clips, _pmap(_clip_header, clips, workers)))
    skipped['broken_clips'] = {c: w for c, w in why.items() if w}
    pools = {cls: {k: [c for c in side if not why[c]] for k, side in p.items()} for cls, p in listed.items()}
    if not os.path.isfile(os.path.join(audio, 'vggsound.csv')):
        for p in pools.values():   # ranked, so that a class with >= 2 clips always has test clips
            ranked = sorted(p['train'], key=lambda q: (_unit('audio', os.path.basename(q)), q))
            k = max(1, round(AUDIO_TEST_FRAC * len(ranked))) if len(ranked) > 1 else 0
            p['test'], p['train'] = ranked[:k], ranked[k:]
    pools = {c: p for c, p in pools.items() if p['train'] or p['test']}
    if not pools:
        raise ValueError(f'--audio {audio}: no readable clips found ({len(skipped["broken_clips"])} broken); expected '
                         f'vggsound.csv or per-label folders such as {folder_name(TABLE7["dog"][4])}/ with '
                         f'{"/".join(AUDIO_EXTS)} files')
    shared = _share(pools)
    return {c: {k: sorted(v) for k, v in pools[c].items()} for c in sorted(pools)}, shared, skipped


def _instances(coco, name):
    path = os.path.join(coco, 'annotations', f'instances_{name}2017.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: COCO instances file not found (--coco must hold the COCO 2017 layout)')
    return path


def load_split(coco, name):
    """COCO `instances_{name}2017.json` -> [Img] holding VPO-class objects, sorted by image id, and
    {captions file: persons painted ignore} when the captions file is missing (else {}).

    Polygons are ~75% of the file and selection needs none of them: they are cut out of the raw text (each
    becomes 0) before parsing, 4x faster and a fraction of the memory; attach_polygons() reads the chosen ones."""
    path = _instances(coco, name)
    with open(path, 'rb') as f:
        data = read_json(path, POLYGONS.sub(b'"segmentation": 0', f.read()), keys=('images', 'annotations',
                                                                                   'categories'))
    names = {c['id']: c['name'] for c in data['categories']}
    keep = {i for i, n in names.items() if n in CLS_INDEX or n == 'person'}
    by_image = defaultdict(list)
    for a in data['annotations']:
        if a['category_id'] in keep:
            by_image[a['image_id']].append(a)
    with_person = {i for i, anns in by_image.items() if any(names[a['category_id']] == 'person' for a in anns)}
    captions = os.path.join(coco, 'annotations', f'captions_{name}2017.json')
    persons = person_classes(captions, with_person)
    lost = {} if os.path.isfile(captions) else {captions: sum(
        names[a['category_id']] == 'person' and not a.get('iscrowd', 0) for anns in by_image.values() for a in anns)}
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
    return images, lost


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


def _split_images(coco, seed, val_frac):
    """{split: [Img]} (test = COCO val2017, val = a seeded hash share of train2017) and missing captions files."""
    test, lost = load_split(coco, 'val')
    train, lost_train = load_split(coco, 'train')
    both = {im.image_id for im in test} & {im.image_id for im in train}
    if both:   # inst/<image_id>.png and the split-by-image rule need ids unique across the two files
        raise ValueError(f'{coco}/annotations: image ids {sorted(both)[:5]} are in both train2017 and val2017')
    images = {'train': [], 'val': [], 'test': test}
    for im in train:
        images['val' if _unit('split', seed, im.image_id) < val_frac else 'train'].append(im)
    return images, {**lost_train, **lost}


def _plan(images, pools, seed):
    """{(subset, split): [(Img, sounding ann ids, clip of each object)]} from the images and clip pools."""
    plan = {}
    for si, (subset, pick) in enumerate(zip(SUBSETS, (_ss, _ms, _msmi))):
        for pi, split in enumerate(SPLITS):
            pool = 'test' if split == 'test' else 'train'
            rows = pick(images[split], lambda o: o.area >= MIN_AREA and o.cls in pools,
                        np.random.default_rng([seed, si, pi]))
            draw = _dealer(pools, pool, np.random.default_rng([seed, si, pi, 1]))
            plan[subset, split] = [(im, loud, [draw(o.cls) for o in im.objs]) for im, loud in rows]
    return plan


def _silent(levels, cls_of):
    """{clip: why} for decoded clips that cannot be a sounding source (module docstring: SILENT_RMS, SILENT_REL)."""
    by_cls = defaultdict(list)
    for c, rms in levels.items():
        if not isinstance(rms, str):
            by_cls[cls_of[c]].append(rms)
    median = {cls: float(np.median(v)) for cls, v in by_cls.items()}
    return {c: f'rms {rms:.2g}, class median {median[cls_of[c]]:.2g}' for c, rms in levels.items()
            if not isinstance(rms, str) and (rms < SILENT_RMS or rms < SILENT_REL * median[cls_of[c]])}


def select(coco, audio, *, seed=0, val_frac=0.15, workers=1, check_images=True):
    """Read COCO + the audio listing and choose every sample: {(subset, split): [(Img, sounding ids, clips)]},
    the clip pools, the classes sharing train/test clips and what was skipped (module docstring).

    The files chosen are checked in `workers` processes: images decoded (unless not `check_images`), clips
    decoded in full. What fails is left out and the (cheap) selection redone until everything chosen passes.
    Polygons are not read here (attach_polygons)."""
    if not os.path.isdir(coco):
        raise FileNotFoundError(f'--coco {coco}: no such directory')
    pools, shared, skipped = find_audio(audio, workers=workers)
    images, skipped['missing_captions'] = _split_images(coco, seed, val_frac)
    cls_of = {c: cls for cls, p in pools.items() for side in p.values() for c in side}
    levels, bad_images, seen, silent = {}, {}, set(), {}
    while True:
        plan = _plan(images, pools, seed)
        todo = sorted({(im.path, im.w, im.h) for rows in plan.values() for im, _, _ in rows} - seen) \
            if check_images else []
        seen.update(todo)
        bad_images.update((t[0], w) for t, w in zip(todo, _pmap(_image_problem, todo, workers)) if w)
        new = sorted({c for rows in plan.values() for _, _, clips in rows for c in clips if c} - set(levels))
        levels.update(zip(new, _pmap(_clip_rms, new, workers)))
        silent.update(_silent(levels, cls_of))
        drop = {c for c, rms in levels.items() if isinstance(rms, str)} | set(silent)
        if not any(im.path in bad_images or drop.intersection(clips) for rows in plan.values()
                   for im, _, clips in rows):
            break
        images = {s: [im for im in v if im.path not in bad_images] for s, v in images.items()}
        pools = {c: {k: [x for x in side if x not in drop] for k, side in p.items()} for c, p in pools.items()}
        pools = {c: p for c, p in pools.items() if p['train'] or p['test']}
        shared = sorted(set(shared) | set(_share(pools)))
    skipped['broken_clips'].update((c, rms) for c, rms in levels.items() if isinstance(rms, str))
    lost = Counter(o.cls for v in images.values() for im in v for o in im.objs
                   if o.area >= MIN_AREA and o.cls not in pools)
    skipped.update(silent_clips=silent, broken_images=bad_images, classes_without_audio=lost)
    return plan, pools, shared, {k: dict(sorted(v.items())) if isinstance(v, dict) else v
                                 for k, v in sorted(skipped.items())}


# ---------------------------------------------------------------- writing
def attach_polygons(coco, plan):
    """Put the polygons that load_split() cut out back into the annotations of the chosen images."""
    for name, splits in (('train', ('train', 'val')), ('val', ('test',))):
        need = {a['id']: a for (_, split), rows in plan.items() if split in splits for im, _, _ in rows
                for a in [o.ann for o in im.objs] + im.ignore if not isinstance(a['segmentation'], dict)}
        if need:
            for a in read_json(_instances(coco, name))['annotations']:
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
        lut = np.zeros(256, np.uint8)   # lookup table: an id-by-id in-place remap turns car into airplane
        lut[255] = 255
        lut[[k for k, _ in pairs]] = [i for _, i in pairs]
        Image.fromarray(lut[inst]).save(path, compress_level=1)
    return im.image_id, stats


def _write_manifests(out, manifests, meta, progress, skipped=None):
    """Write `{subset}/{split}.jsonl`, meta.json and summary.json (with what was `skipped`); print the summary."""
    for (name, split), rows in manifests.items():
        with open(os.path.join(out, name, f'{split}.jsonl'), 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows)
    summary = summarise(manifests)
    if skipped is not None:
        summary['skipped'] = skipped
    for fname, obj in (('meta.json', meta), ('summary.json', summary)):
        with open(os.path.join(out, fname), 'w') as f:
            json.dump(obj, f, indent=1)
    if progress:
        print_summary(summary)
    return summary


def _refuse_nonempty(out):
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f'--out {out} exists and is not empty: give another --out, or remove it first')


@contextlib.contextmanager
def _new_folder(out):
    """Yield a sibling `<out>.partial-<pid>` to write into, renamed to `out` once the block succeeds and removed if
    it fails. `out` must not exist or be empty: a build never mixes its files with an older one's."""
    _refuse_nonempty(out)
    tmp = f'{os.path.normpath(out)}.partial-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)   # left by a killed run of ours that had the same pid
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    try:
        os.rename(tmp, out)
    except OSError as e:
        raise FileExistsError(f'--out {out}: {e.strerror}; the finished build is in {tmp}') from None


def _mask_jobs(plan, tmp):
    """One job per image: (Img, inst path, [(mask path, [(instance k, class index)])]), sorted by image id."""
    tasks = {}
    for (subset, split), rows in plan.items():
        os.makedirs(os.path.join(tmp, f'vpo_{subset}', 'masks', split), exist_ok=True)
        for n, (im, loud, _) in enumerate(rows):
            t = tasks.setdefault(im.image_id, (im, os.path.join(tmp, 'inst', f'{im.image_id}.png'), []))
            t[2].append((os.path.join(tmp, f'vpo_{subset}', 'masks', split, f'{n:06d}.png'),
                         [(k + 1, CLS_INDEX[o.cls]) for k, o in enumerate(im.objs) if o.ann_id in loud]))
    os.makedirs(os.path.join(tmp, 'inst'), exist_ok=True)
    return [tasks[i] for i in sorted(tasks)]


def build(coco, audio, out, *, seed=0, itd=False, val_frac=0.15, workers=min(4, os.cpu_count() or 1),
          progress=True):
    """Build VPO-SS/MS/MSMI into the new folder `out` (layout: README); return the summary (App. A.1).

    `out` must not exist or be empty; it appears complete or not at all (_new_folder). Files are checked and
    what is left out is listed in the summary (module docstring)."""
    _refuse_nonempty(out)   # now, not after minutes of selection
    t0 = time.perf_counter()
    plan, pools, shared, skipped = select(coco, audio, seed=seed, val_frac=val_frac, workers=workers)
    if progress:
        print(f'selection and file checks: {time.perf_counter() - t0:.1f} s; shared train/test audio: {shared}')
    attach_polygons(coco, plan)
    with _new_folder(out) as tmp:
        jobs = _mask_jobs(plan, tmp)
        bar = dict(total=len(jobs), desc='writing masks', disable=not progress)
        if workers > 1:
            with multiprocessing.Pool(workers) as p:
                stats = dict(tqdm(p.imap(_write_image, jobs, chunksize=16), **bar))
        else:
            stats = dict(tqdm(map(_write_image, jobs), **bar))
        rel = lambda p: os.path.relpath(p, out) if p else None   # `tmp` is a sibling of `out`: same relative paths
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
        return _write_manifests(tmp, manifests, meta, progress, skipped)


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
    """Table of sounding objects per class (rows) and subset (columns: train/val/test), samples, what was skipped."""
    names = [n for n in summary if n != 'skipped']
    print(f'{"class":14s}' + ''.join(f'{n + " train/val/test":>26s}' for n in names))
    cell = lambda d: '/'.join(str(d.get(k, 0)) for k in SPLITS)
    for c in VPO_CLASSES[1:]:
        print(f'{c:14s}' + ''.join(f'{cell(summary[n]["classes"][c]):>26s}' for n in names))
    print(f'{"samples":14s}' + ''.join(f'{cell(summary[n]["samples"]):>26s}' for n in names))
    for n in names:
        i = summary[n]['imbalance']
        print(f'{n}: imbalance N_max/N_min = {i["ratio"]} ({i["max"]} / {i["min"]}); missing: {i["missing"]}')
    print_skipped(summary.get('skipped') or {})


def print_skipped(skipped):
    """What a build left out and what that costs, a few names each (summary.json has them all)."""
    def few(names):
        names = list(names)
        return ', '.join(names[:3]) + (f', ... ({len(names)} in all)' if len(names) > 3 else '')
    known = {folder_name(label) for label in LABEL_TO_CLASS}
    folders = [d + (f' (meant {folder_name(d)}?)' if folder_name(d) in known else '')
               for d in skipped.get('unknown_audio_folders', ())]
    if folders:
        print(f'skipped audio folders that are not Table 7 labels: {few(folders)}')
    if skipped.get('missing_clips'):
        print(f'skipped {skipped["missing_clips"]} vggsound.csv lines of Table 7 labels: no clip on disk')
    for key in ('broken_clips', 'silent_clips', 'broken_images'):
        if skipped.get(key):
            print(f'left out {len(skipped[key])} {key.replace("_", " ")}: '
                  f'{few(f"{k} ({v})" for k, v in skipped[key].items())}')
    for path, n in skipped.get('missing_captions', {}).items():
        print(f'no captions file {path}: its {n} persons are painted 255 = ignore (male/female/baby undecided)')
    if skipped.get('classes_without_audio'):
        print('classes without audio: ' + ', '.join(f'{c} ({n} objects cannot sound)'
                                                    for c, n in skipped['classes_without_audio'].items()))


# ---------------------------------------------------------------- official release (authors' config/config_vpo_*.py)
def _remap_official(src, dst):
    """Released mask (ids stored in an L or P PNG: COCO ids + 92/93/94) -> our class indices, written to dst."""
    with Image.open(src) as m:
        ids = id_array(m, src)   # H, W
    Image.fromarray(OFFICIAL_LUT[ids]).save(dst)   # lookup table, not an id-by-id remap


def official_cache(root):
    """Where read_official() keeps what it derives from the release at `root`: OFFICIAL_CACHE/<name>-<hash of the
    release's absolute path>. Never inside the release: it may be read-only, and it is the user's."""
    real = os.path.realpath(root)
    return os.path.join(OFFICIAL_CACHE, f'{os.path.basename(real) or "release"}-'
                                        f'{hashlib.blake2b(real.encode(), digest_size=6).hexdigest()}')


_ANNOUNCED = set()   # caches whose place was printed by this process


def read_official(root, subset, split, *, audio=None, seed=0, val_frac=0.15, cache=None, progress=True):
    """Rows of our manifest format for `split` of the released `VPO-{SS,MS,MSMI}/vpo_*_data_stereo.csv`.

    Their 'val' split is their test set -> our 'test'; our 'val' is `val_frac` of their train images by the
    same seeded image hash as build(). Only sounding objects are known (no silent ones, no areas, no instance
    map: 'inst' is None). Paths are absolute; 'mask' is the released mask remapped by OFFICIAL_LUT to our
    class indices, written into `cache` (default official_cache(root): <repo>/data/official/<release>-<hash>/,
    mirroring the release's file names; remade when the released mask is newer). The release is only read."""
    subset = subset.removeprefix('vpo_')
    if split not in SPLITS:
        raise ValueError(f'unknown split {split!r}; known: {SPLITS}')
    rows = _official_rows(root, subset, audio=audio, seed=seed, val_frac=val_frac)[split]
    cache = cache or official_cache(root)
    if progress and cache not in _ANNOUNCED:
        _ANNOUNCED.add(cache)
        print(f'official VPO {root}: remapped masks are kept in {cache}')
    todo = []
    for r in rows:
        src, r['mask'] = r['mask'], os.path.join(cache, os.path.relpath(r['mask'], root))
        if not os.path.isfile(r['mask']) or os.path.getmtime(r['mask']) < os.path.getmtime(src):
            todo.append((src, r['mask']))
    for src, dst in tqdm(todo, desc=f'remapping vpo_{subset}/{split} masks', disable=not progress or not todo):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f'{dst}.{os.getpid()}.tmp.png'   # per process: another process may be writing the same mask
        _remap_official(src, tmp)
        os.replace(tmp, dst)   # a crash never leaves a half-written mask behind
    return rows


def _official_audio(root, audio):
    """The folder of the released clips: AUDIO/audios if given, else ROOT/VGGSound/audios or, as the authors'
    config/config_vpo_*.py lay it out (<datasets>/VPO/VPO-SS, <datasets>/vggsound_bench/VGGSound/audios),
    ROOT/../vggsound_bench/VGGSound/audios."""
    if audio:
        places = [os.path.join(audio, 'audios')]
    else:
        places = [os.path.join(root, 'VGGSound', 'audios'),
                  os.path.join(os.path.dirname(os.path.abspath(root)), 'vggsound_bench', 'VGGSound', 'audios')]
    found = next((p for p in places if os.path.isdir(p)), None)
    if not found:
        raise FileNotFoundError(f'released clips not found in {" nor ".join(places)}; give --audio (the folder '
                                f'holding audios/)')
    return found


def _official_lines(table):
    """[(line number, row dict)] of a released csv, every field present and parsed; bad lines name themselves."""
    need = ('split', 'cateName', 'img_Id', 'ann_Ids', 'vgg_file', 'audio_pos')
    try:
        with open(table, newline='') as f:
            reader = csv.DictReader(f)
            lines = list(enumerate(reader, 2))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f'{table}: not a text csv file: {e}') from None
    missing = [k for k in need if k not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f'{table}: columns {missing} missing (header {reader.fieldnames}); expected a released '
                         f'vpo_*_data_stereo.csv')
    for line, r in lines:
        if None in r or None in r.values():   # DictReader: extra fields under None, missing ones None
            got = sum(v is not None for k, v in r.items() if k is not None) + len(r.get(None, ()))
            raise ValueError(f'{table}:{line}: {got} fields, the header has {len(reader.fieldnames)} (truncated?)')
        if r['cateName'] not in CLS_INDEX:
            raise ValueError(f'{table}:{line}: unknown class {r["cateName"]!r}; known: {VPO_CLASSES[1:]}')
        for key, parse in (('img_Id', int), ('ann_Ids', lambda s: int(float(s))), ('audio_pos', float),
                           ('multi_instance', lambda s: int(float(s or 1)))):
            try:
                r[key] = parse(r.get(key))
            except (ValueError, OverflowError, TypeError):
                raise ValueError(f'{table}:{line}: {key} {r.get(key)!r} is not a number') from None
        if not 0.0 <= r['audio_pos'] <= 1.0:
            raise ValueError(f'{table}:{line}: audio_pos {r["audio_pos"]} outside [0, 1]')
    return lines


def _official_rows(root, subset, *, audio=None, seed=0, val_frac=0.15):
    """{split: rows} of a released csv; SS: one row per line, MS/MSMI: lines grouped by image; raw masks."""
    base = os.path.join(root, f'VPO-{subset.upper()}')
    table = os.path.join(base, f'vpo_{subset}_data_stereo.csv')
    if not os.path.isfile(table):
        raise FileNotFoundError(f'{table}: released VPO csv not found (--official must hold VPO-{subset.upper()}/)')
    audio = _official_audio(root, audio)

    def find(folder, name, cate):   # released files are flat or in per-class folders, depending on the subset
        paths = [os.path.join(folder, name), os.path.join(folder, cate, name)]
        return next((p for p in paths if os.path.isfile(p)), paths[0])
    groups = {}
    for line, r in _official_lines(table):
        r['clip'] = inside(audio, r['vgg_file'] + '.wav', source=f'{table}:{line}: vgg_file')
        key = (r['split'], r['img_Id'], r['ann_Ids'], line) if subset == 'ss' else (r['split'], r['img_Id'])
        groups.setdefault(key, []).append((line, r))
    rows = {s: [] for s in SPLITS}
    for key, lines in groups.items():
        (line, r0), lines = lines[0], [r for _, r in lines]
        img = key[1]
        split = 'test' if key[0] in ('val', 'test') else 'val' if _unit('split', seed, img) < val_frac else 'train'
        folder = base if subset != 'msmi' or r0['multi_instance'] else \
            os.path.join(root, 'VPO-MS')   # MSMI lines with multi_instance = 0 live in VPO-MS
        name = f'{img:012d}_{key[2]:012d}.png' if subset == 'ss' else f'{img:012d}.png'
        mask = find(os.path.join(folder, 'mask'), name, r0['cateName'])
        if not os.path.isfile(mask):
            raise FileNotFoundError(f'{mask}: mask of {table}:{line} not found')
        with Image.open(mask) as m:
            width, height = m.size
        rows[split].append({
            'id': f'vpo_{subset}/{split}/{len(rows[split]):06d}',
            'image': find(os.path.join(folder, 'data'), f'{img:012d}.jpg', r0['cateName']),
            'image_id': img, 'height': height, 'width': width, 'mask': mask, 'inst': None,
            'objects': [{'cls': r['cateName'], 'ann_id': r['ann_Ids'], 'alpha': r['audio_pos'], 'area': None,
                         'sounding': True, 'clip': r['clip']} for r in lines]})
    return rows


def convert_official(root, out, *, audio=None, seed=0, val_frac=0.15, progress=True):
    """Turn the released VPO into our layout in the new folder `out` (masks remapped by OFFICIAL_LUT; `out` appears
    complete or not at all, as in build()); return the summary."""
    found = [s for s in SUBSETS if os.path.isfile(os.path.join(root, f'VPO-{s.upper()}', f'vpo_{s}_data_stereo.csv'))]
    if not found:
        raise FileNotFoundError(f'--official {root}: no VPO-SS/MS/MSMI/vpo_*_data_stereo.csv found')
    manifests = {}
    with _new_folder(out) as tmp:
        for subset in found:
            for split, rows in _official_rows(root, subset, audio=audio, seed=seed, val_frac=val_frac).items():
                os.makedirs(os.path.join(tmp, f'vpo_{subset}', 'masks', split), exist_ok=True)
                for n, r in enumerate(tqdm(rows, desc=f'vpo_{subset}/{split}', disable=not progress)):
                    src, r['mask'] = r['mask'], f'vpo_{subset}/masks/{split}/{n:06d}.png'
                    _remap_official(src, os.path.join(tmp, r['mask']))
                    r['image'] = os.path.relpath(r['image'], out)
                    for o in r['objects']:
                        o['clip'] = os.path.relpath(o['clip'], out)
                manifests[f'vpo_{subset}', split] = rows
        meta = {'version': VERSION, 'seed': seed, 'itd': False, 'classes': VPO_CLASSES, 'source': 'official',
                'val_frac': val_frac}
        return _write_manifests(tmp, manifests, meta, progress)


def _outside_builtin_cache(out):
    """Refuse an --out inside data/ beside vpo.py or a folder holding builtin.json: data.py writes, rebuilds and
    deletes the built-in source there, and would take a real build there for the built-in one."""
    real, cache = os.path.realpath(out), os.path.realpath(os.path.join(HERE, 'data'))
    up = [real]
    while os.path.dirname(up[-1]) != up[-1]:
        up.append(os.path.dirname(up[-1]))
    if cache in up or any(os.path.isfile(os.path.join(d, 'builtin.json')) for d in up):
        raise ValueError(f'--out {out}: inside {cache if cache in up else "a built-in cache (builtin.json)"}, which '
                         f'data.py rebuilds for its built-in source; give a folder elsewhere')


def main():
    ap = argparse.ArgumentParser(description='Build the VPO benchmark (paper Sec. 3) or convert the released one.')
    # inputs
    ap.add_argument('--coco', default=None, help='COCO 2017 root: annotations/instances_{train,val}2017.json, '
                                                 'optional captions_*2017.json, train2017/, val2017/')
    ap.add_argument('--audio', default=None, help='VGGSound: per-label folders or vggsound.csv + clips; with '
                                                  '--official: the folder holding audios/ (default OFFICIAL/VGGSound '
                                                  'or OFFICIAL/../vggsound_bench/VGGSound)')
    ap.add_argument('--official', default=None, help='convert the released VPO (folder holding VPO-SS/MS/MSMI) instead')
    ap.add_argument('--out', default=None, help='required: a new output folder (absent or empty), not inside data/ '
                                                '(the built-in cache, which data.py rebuilds)')
    # synthesis
    ap.add_argument('--seed', type=int, default=0, help='seed of splits, selection and clip pairing')
    ap.add_argument('--itd', action='store_true', default=False, help='record that loaders add an interaural delay')
    ap.add_argument('--val-frac', type=float, default=0.15, help='share of train2017 images in the val split')
    ap.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1),
                    help='processes checking files and writing masks')
    # benchmark
    ap.add_argument('--bench-selection', type=int, default=0, metavar='N_IMAGES',
                    help='time selection on a generated COCO-sized file of N images (118287 = train2017) and exit')
    args = ap.parse_args()
    if args.bench_selection:
        return bench_selection(args.bench_selection)
    if not (args.official or (args.coco and args.audio)):
        ap.error('give --coco and --audio, or --official, or --bench-selection')
    if not args.out:
        ap.error('--out is required: a new folder for the benchmark')
    try:
        _outside_builtin_cache(args.out)
        if args.official:
            convert_official(args.official, args.out, audio=args.audio, seed=args.seed, val_frac=args.val_frac)
        else:
            build(args.coco, args.audio, args.out, seed=args.seed, itd=args.itd, val_frac=args.val_frac,
                  workers=args.workers)
    except (ValueError, OSError, KeyError) as e:   # bad input: one line, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- selection benchmark (--bench-selection)
def _fake_coco(root, n_images, seed=0):
    """COCO-train2017-like files: 7.3 instances per image (860k / 118k), COCO's class frequencies (60 non-VPO
    classes lumped evenly), 3 theme classes per image, log-uniform areas, 1% crowd RLE, 24-vertex polygons;
    5 short noise clips per Table 7 label. No images: the benchmark selects with check_images=False."""
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
        poly = np.round(xy[:, None] + rng.uniform(0, 0.5, (len(img), 24, 2)) * side[:, None, None], 2)  # A, 24, 2
        anns = (f'{{"id": {a + 1}, "image_id": {i}, "category_id": {cats[c]["id"]}, "iscrowd": {int(z)}, "area": '
                f'{w * w / 4:.2f}, "bbox": [{u:.2f}, {v:.2f}, {w / 2:.2f}, {w / 2:.2f}], "segmentation": '
                f'{crowd_rle if z else [pl]}}}' for a, (i, c, z, w, (u, v), pl) in enumerate(zip(
                    img.tolist(), cat.tolist(), (rng.random(len(img)) < 0.01).tolist(), side.tolist(), xy.tolist(),
                    poly.reshape(len(img), -1).tolist())))
        head = json.dumps({'categories': cats, 'images': [{'id': i, 'file_name': f'{i:012d}.jpg', 'height': 480,
                                                           'width': 640} for i in range(i0, i0 + n)]})
        with open(os.path.join(root, 'annotations', f'instances_{split}2017.json'), 'w') as f:
            f.write(head[:-1] + ', "annotations": [')
            f.writelines((', ' if a else '') + ann for a, ann in enumerate(anns))   # streamed: GBs at full size
            f.write(']}')
        words = np.array(['a man', 'a woman', 'a baby', 'people', 'a person'])[rng.integers(5, size=n)]
        with open(os.path.join(root, 'annotations', f'captions_{split}2017.json'), 'w') as f:
            json.dump({'annotations': [{'image_id': i + i0, 'id': 5 * i + k, 'caption': f'{w} with a dog'}
                                       for i, w in enumerate(words.tolist()) for k in range(5)]}, f)
    for label in LABEL_TO_CLASS:
        os.makedirs(os.path.join(root, 'audio', folder_name(label)))
        for k in range(5):
            sf.write(os.path.join(root, 'audio', folder_name(label), f'clip{k}.wav'),
                     0.1 * rng.standard_normal(800).astype(np.float32), 16000)


def _timed_select(coco, audio):
    t = time.perf_counter()
    plan = select(coco, audio, check_images=False)[0]
    use = resource.getrusage(resource.RUSAGE_SELF)   # CPU seconds too: wall time depends on the machine's load
    return time.perf_counter() - t, use.ru_utime + use.ru_stime, use.ru_maxrss / 2 ** 20, \
        {f'{a}/{b}': len(v) for (a, b), v in plan.items()}


def bench_selection(n_images, *, seed=0):
    """Generate a COCO-sized file in a temp dir, time select() in a fresh process; peak RSS (GiB) of that process."""
    ctx = multiprocessing.get_context('spawn')   # a child inherits its parent's peak RSS: keep this one small
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with ctx.Pool(1) as p:
            p.apply(_fake_coco, (tmp, n_images, seed))
        size = os.path.getsize(os.path.join(tmp, 'annotations', 'instances_train2017.json')) / 2 ** 20
        print(f'generated {n_images} images ({size:.0f} MiB json) in {time.perf_counter() - t:.0f} s')
        with ctx.Pool(1) as p:   # a fresh process: its peak RSS is selection's alone
            seconds, cpu, gib, counts = p.apply(_timed_select, (tmp, os.path.join(tmp, 'audio')))
    print(f'selection: {seconds:.1f} s wall, {cpu:.1f} s CPU, peak RSS {gib:.2f} GiB; load average '
          f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; samples: {counts}')
    return {'seconds': seconds, 'cpu_seconds': cpu, 'peak_gib': gib, 'json_mib': size, 'samples': counts}


if __name__ == '__main__':
    main()
