"""The cavp test suite: mathematics on tiny tensors and a tiny built-in source, on CPU, fast. Sections follow the
paper: Sec. 3 (VPO, data), Sec. 4.1 (model), Sec. 4.2 (loss), App. B.1 (training), Sec. 5 / App. C (evaluation),
Tables 1-3 (AVSBench).

    pytest test_all.py                  # the whole suite (a few minutes on 2 cores)
    pytest test_all.py -k "not e2e"     # the maths and data alone, without training runs (under a minute)
    pytest test_all.py -k loss          # one area
"""
import ast
import contextlib
import copy
import csv
import filecmp
import functools
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
import evaluate as ev
import loss
import model
import train
import vpo
from data import (AVSBenchDataset, EXAMPLE_HOP, EXAMPLE_SAMPLES, binary_label, joint_augment, normalise, palette,
                  semantic_label, vggish_logmel)
from model import ATTN, CAVP, VGGish, load_vggish_weights
from pycocotools import mask as maskutils

pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')   # pycocotools + numpy 2


@pytest.fixture(scope='session')
def builtin(tmp_path_factory):
    """A tiny built-in source (the same code path as the default run, fewer images)."""
    root = tmp_path_factory.mktemp('builtin')
    return data.ensure_builtin(str(root), n_train=30, n_val=10, clips_per_class=3, progress=False)


# ====================================================================================================
# Sec. 3, App. A, Table 7: VPO synthesis from COCO + audio clips, the official release (vpo.py)
# ====================================================================================================

VW, VH = 160, 120
CATS = {'person': 1, 'car': 3, 'airplane': 5, 'sheep': 20, 'dog': 18, 'cat': 17, 'horse': 19, 'zebra': 24,
        'giraffe': 25}   # giraffe: a non-VPO distractor
# one template per image kind: (category, box x0, y0, x1, y1, segmentation kind)
TEMPLATES = [
    [('dog', 5, 40, 55, 90, 'poly'), ('cat', 100, 30, 150, 80, 'poly'), ('giraffe', 60, 0, 95, 40, 'poly'),
     ('person', 60, 60, 95, 115, 'poly')],                                   # multi-class, person = male
    [('airplane', 0, 0, 120, 80, 'poly'), ('car', 80, 50, 150, 110, 'poly')],  # car over airplane (LUT)
    [('dog', 5, 40, 50, 90, 'poly'), ('dog', 110, 40, 155, 90, 'poly'), ('cat', 60, 40, 100, 80, 'poly'),
     ('sheep', 0, 0, 40, 30, 'crowd_str'), ('car', 120, 0, 160, 30, 'crowd_list')],  # multi-instance + crowds
    [('zebra', 40, 20, 120, 100, 'poly')],                                   # a single object
    [('horse', 10, 10, 70, 100, 'poly'), ('person', 90, 10, 150, 110, 'poly')],  # persons undecided
    [('dog', 10, 10, 70, 100, 'poly'), ('person', 90, 10, 150, 110, 'rle_str'), ('horse', 80, 0, 100, 20, 'poly')],
]
CAPTIONS = {0: ['a man with his dog and cat'] * 5, 4: ['a man and a woman near a horse'] * 5,
            5: ['a baby with a dog', 'a baby and a puppy', 'a dog', 'a dog', 'a baby elephant toy']}


def _rle_list(m):
    flat = m.ravel(order='F').astype(int)   # COCO RLE runs are column-major, starting with a run of zeros
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def _seg(kind, x0, y0, x1, y1):
    if kind == 'poly':
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]
    m = np.zeros((VH, VW), np.uint8)
    m[y0:y1, x0:x1] = 1
    if kind == 'crowd_list':
        return {'size': [VH, VW], 'counts': _rle_list(m)}
    rle = maskutils.encode(np.asfortranarray(m))
    return {'size': [VH, VW], 'counts': rle['counts'].decode()}


def make_coco(root, n_train=24, n_val=12):
    os.makedirs(os.path.join(root, 'annotations'))
    aid = 0
    for split, n, base in (('train', n_train, 1), ('val', n_val, 1001)):
        images, anns, caps = [], [], []
        for i in range(base, base + n):
            t = i % len(TEMPLATES)
            images.append({'id': i, 'file_name': f'{i:012d}.jpg', 'height': VH, 'width': VW})
            os.makedirs(os.path.join(root, f'{split}2017'), exist_ok=True)   # vpo.py decodes every image it uses
            Image.new('RGB', (VW, VH), (i % 256, 90, 160)).save(os.path.join(root, f'{split}2017', f'{i:012d}.jpg'))
            for cat, x0, y0, x1, y1, kind in TEMPLATES[t]:
                aid += 1
                anns.append({'id': aid, 'image_id': i, 'category_id': CATS[cat], 'iscrowd': int('crowd' in kind),
                             'area': float((x1 - x0) * (y1 - y0)), 'bbox': [x0, y0, x1 - x0, y1 - y0],
                             'segmentation': _seg(kind, x0, y0, x1, y1)})
            caps += [{'id': len(caps), 'image_id': i, 'caption': c} for c in CAPTIONS.get(t, [])]
        with open(os.path.join(root, 'annotations', f'instances_{split}2017.json'), 'w') as f:
            json.dump({'images': images, 'annotations': anns,
                       'categories': [{'id': v, 'name': k} for k, v in CATS.items()]}, f)
        with open(os.path.join(root, 'annotations', f'captions_{split}2017.json'), 'w') as f:
            json.dump({'annotations': caps}, f)


def make_audio(root, n=6):
    for cls, labels in vpo.TABLE7.items():
        d = os.path.join(root, vpo.folder_name(labels[0]))
        os.makedirs(d)
        for k in range(n):
            noise = 0.1 * np.random.default_rng(k).standard_normal(160).astype(np.float32)   # silent clips are left out
            sf.write(os.path.join(d, f'{cls[:3]}{k}_{k:06d}.wav'), noise, 16000)


@pytest.fixture(scope='module')
def vpo_built(tmp_path_factory):
    root = tmp_path_factory.mktemp('vpo')
    make_coco(str(root / 'coco'))
    make_audio(str(root / 'audio'))
    outs = []
    for name, workers in (('out1', 1), ('out2', 2)):
        vpo.build(str(root / 'coco'), str(root / 'audio'), str(root / name), seed=3, val_frac=0.3,
                  workers=workers, progress=False)
        outs.append(str(root / name))
    rows = {(s, p): [json.loads(l) for l in open(os.path.join(outs[0], f'vpo_{s}', f'{p}.jsonl'))]
            for s in vpo.SUBSETS for p in vpo.SPLITS}
    return root, outs, rows


def test_folder_name():
    assert vpo.folder_name('male speech, man speaking') == 'male_speech_man_speaking'
    assert vpo.folder_name('dog bow-wow') == 'dog_bow_wow'
    assert vpo.folder_name('race car, auto racing') == 'race_car_auto_racing'
    assert len(vpo.TABLE7) == 21 and set(vpo.TABLE7) == set(vpo.VPO_CLASSES[1:])


def test_pan_convention():
    w = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    s = vpo.pan(w, 0.2)
    assert s.shape == (2, 1000) and np.abs(s[0]).sum() > np.abs(s[1]).sum()   # left loud for alpha < 0.5
    np.testing.assert_allclose(s.sum(0), w, rtol=1e-5, atol=1e-6)
    assert not vpo.pan(w, 0.0)[1].any()
    with pytest.raises(ValueError):
        vpo.pan(w, 1.5)


def test_itd_delays_far_ear():
    w = np.random.default_rng(1).standard_normal(400).astype(np.float32)
    left = vpo.pan(w, 0.1, itd=True)    # source on the left: right ear is far, hears it late
    d = int(np.argmax([np.dot(left[1, k:], w[:400 - k]) for k in range(20)]))
    assert 5 <= d <= 11 and np.allclose(left[0], 0.9 * w) and np.allclose(left[1, d:], 0.1 * w[:-d], atol=1e-6)
    right = vpo.pan(w, 0.95, itd=True)
    assert np.allclose(right[1], 0.95 * w) and not np.allclose(right[0], 0.05 * w)
    assert np.array_equal(vpo.pan(w, 0.5, itd=True), vpo.pan(w, 0.5))       # centre: no delay
    assert vpo.pan(w, 0.0, itd=True).shape == (2, 400) and vpo.pan(w[:3], 0.0, itd=True).shape == (2, 3)


def test_mix_never_clips():
    rng = np.random.default_rng(2)
    loud = [vpo.pan(rng.uniform(-1, 1, 500), a) for a in (0.1, 0.2, 0.3, 0.9)]
    m = vpo.mix(loud)
    assert m.shape == (2, 500) and np.abs(m).max() <= 1.0 + 1e-6
    quiet = [vpo.pan(0.1 * rng.uniform(-1, 1, 500), a) for a in (0.3, 0.7)]
    np.testing.assert_allclose(vpo.mix(quiet), quiet[0] + quiet[1], rtol=1e-6)   # no clipping: untouched


def test_polygons_are_cut_before_parsing():
    anns = [{'id': 1, 'segmentation': [[1.5, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12.25]], 'area': 3.0},
            {'id': 2, 'segmentation': {'size': [4, 4], 'counts': [0, 16]}, 'iscrowd': 1},
            {'id': 3, 'segmentation': [[1, 2, 3, 4, 5, 6]], 'bbox': [1, 2, 3, 4]}]
    for text in (json.dumps(anns), json.dumps(anns, separators=(',', ':')), json.dumps(anns, indent=2)):
        got = json.loads(vpo.POLYGONS.sub(b'"segmentation": 0', text.encode()))
        assert [a['segmentation'] for a in got] == [0, anns[1]['segmentation'], 0]
        assert got[2]['bbox'] == [1, 2, 3, 4] and got[0]['area'] == 3.0


def test_person_rule(tmp_path):
    caps = {1: ['A man riding a horse', 'a guy on his horse', 'a horse'], 2: ['a man and a woman'] * 3,
            3: ['a baby elephant', 'a baby elephant walks'], 4: ['a little girl', 'two girls', 'a girl'],
            5: ['a baby in a crib', 'an infant sleeping'], 6: ['a man', 'a person'], 7: ['people on a street'] * 5}
    path = tmp_path / 'captions.json'
    path.write_text(json.dumps({'annotations': [{'image_id': i, 'caption': c} for i, cs in caps.items() for c in cs]}))
    got = vpo.person_classes(str(path), set(caps))
    assert got == {1: 'male', 4: 'female', 5: 'baby'}
    assert vpo.person_classes(str(tmp_path / 'missing.json'), {1}) == {}   # no captions: all undecided


def test_same_seed_identical_bytes(vpo_built):
    root, (a, b), _ = vpo_built
    cmp = filecmp.dircmp(a, b)
    dirs = ['.'] + [f'vpo_{s}' for s in vpo.SUBSETS]
    files = [os.path.join(d, f) for d in dirs for f in os.listdir(os.path.join(a, d)) if os.path.isfile(os.path.join(a, d, f))]
    assert len(files) == 11 and not cmp.diff_files   # meta, summary, 9 manifests; serial == 2 workers
    for f in files:
        assert open(os.path.join(a, f), 'rb').read() == open(os.path.join(b, f), 'rb').read(), f
    masks = sorted(os.listdir(os.path.join(a, 'vpo_ms', 'masks', 'train')))
    assert masks and all(filecmp.cmp(os.path.join(a, 'vpo_ms/masks/train', m), os.path.join(b, 'vpo_ms/masks/train', m),
                                     shallow=False) for m in masks)
    vpo.build(str(root / 'coco'), str(root / 'audio'), str(root / 'other'), seed=4, val_frac=0.3, workers=1,
              progress=False)
    assert any(open(os.path.join(a, f), 'rb').read() != open(os.path.join(root, 'other', f), 'rb').read()
               for f in files if f.endswith('.jsonl'))


def test_splits_disjoint_and_sources(vpo_built):
    _, _, rows = vpo_built
    ids = {p: {r['image_id'] for s in vpo.SUBSETS for r in rows[s, p]} for p in vpo.SPLITS}
    assert all(ids.values())
    assert not (ids['train'] & ids['val']) and not (ids['train'] & ids['test']) and not (ids['val'] & ids['test'])
    assert all('val2017' in r['image'] for s in vpo.SUBSETS for r in rows[s, 'test'])
    assert all('train2017' in r['image'] for s in vpo.SUBSETS for p in ('train', 'val') for r in rows[s, p])


def test_alpha_is_centre_of_mass_and_masks(vpo_built):
    root, (out, _), rows = vpo_built
    anns = {a['id']: a for split in ('train', 'val') for a in
            json.load(open(root / 'coco' / 'annotations' / f'instances_{split}2017.json'))['annotations']}
    n = 0
    for (s, p), rs in rows.items():
        for r in rs:
            label = np.asarray(Image.open(os.path.join(out, r['mask'])))
            inst = np.asarray(Image.open(os.path.join(out, r['inst'])))
            assert label.shape == (VH, VW) and set(np.unique(label)) <= set(range(22)) | {255}
            for k, o in enumerate(r['objects'], 1):
                m = vpo._decode(anns[o['ann_id']]['segmentation'], VH, VW)
                cx = (np.nonzero(m)[1] + 0.5).mean() / VW
                assert abs(o['alpha'] - cx) < 1e-3 and o['area'] == m.sum()
                want = vpo.CLS_INDEX[o['cls']] if o['sounding'] else 0
                assert (label[inst == k] == want).all()
                n += 1
            assert (label[inst == 255] == 255).all() and (label[inst == 0] == 0).all()
    assert n > 50


def test_car_and_airplane_stay_distinct(vpo_built):
    _, (out, _), rows = vpo_built
    both = [r for (s, _), rs in rows.items() if s == 'ms' for r in rs
            if {o['cls'] for o in r['objects'] if o['sounding']} == {'car', 'airplane'}]
    assert both
    for r in both:
        label = np.asarray(Image.open(os.path.join(out, r['mask'])))
        assert {1, 5} <= set(np.unique(label).tolist())
        assert label[105, 145] == 5 and label[5, 5] == 1
        assert label[60, 100] == 5   # the overlap: the smaller car is painted over the bigger airplane


def test_subset_rules(vpo_built):
    _, (out, _), rows = vpo_built
    for p in vpo.SPLITS:
        for r in rows['ss', p]:
            loud = [o for o in r['objects'] if o['sounding']]
            assert len(loud) == 1 and [o['cls'] for o in r['objects']].count(loud[0]['cls']) == 1
        for r in rows['ms', p]:
            cls = [o['cls'] for o in r['objects']]
            assert len(cls) == len(set(cls)) and 2 <= sum(o['sounding'] for o in r['objects']) <= 5
        for r in rows['msmi', p]:
            cls = [o['cls'] for o in r['objects']]
            multi = {c for c in cls if cls.count(c) >= 2}
            assert multi and any(o['sounding'] for o in r['objects'] if o['cls'] in multi)
            assert any(not o['sounding'] for o in r['objects'] if o['cls'] in multi)   # stereo must disambiguate
            inst = np.asarray(Image.open(os.path.join(out, r['inst'])))
            assert (inst == 255).sum() == 2 * 40 * 30   # the two crowd regions are ignored
    ss_classes = {o['cls'] for p in vpo.SPLITS for r in rows['ss', p] for o in r['objects'] if o['sounding']}
    assert {'zebra', 'male', 'baby', 'dog', 'cat'} <= ss_classes   # zebra only from single-object images
    assert 'female' not in ss_classes
    person_rows = [r for p in vpo.SPLITS for r in rows['ss', p] if r['image_id'] % 6 == 4]
    assert person_rows and all(o['cls'] == 'horse' for r in person_rows for o in r['objects'])   # undecided: ignored
    summary = json.load(open(os.path.join(out, 'summary.json')))
    tot = {c: sum(v.values()) for c, v in summary['vpo_ss']['classes'].items() if v}
    assert summary['vpo_ss']['imbalance']['ratio'] == round(max(tot.values()) / min(tot.values()), 2)


def test_clips_match_class_and_split(vpo_built):
    _, (out, _), rows = vpo_built
    used = {p: set() for p in vpo.SPLITS}
    for (s, p), rs in rows.items():
        for r in rs:
            for o in r['objects']:
                assert os.path.basename(os.path.dirname(o['clip'])) == vpo.folder_name(vpo.TABLE7[o['cls']][0])
                assert os.path.isfile(os.path.join(out, o['clip']))
                used[p].add(o['clip'])
    assert used['test'] and not (used['test'] & (used['train'] | used['val']))


def test_vggsound_csv_layout(tmp_path):
    (tmp_path / 'clips').mkdir()
    lines = []
    for i, (label, split) in enumerate([('dog barking', 'train'), ('dog barking', 'test'), ('male speech, man speaking',
                                        'train'), ('male speech, man speaking', 'test'), ('playing piano', 'train')]):
        sf.write(str(tmp_path / 'clips' / f'yt{i}_{10 * i:06d}.flac'), np.zeros(160, np.float32), 16000)
        lines.append([f'yt{i}', 10 * i, label, split])
    lines.append(['missing', 0, 'dog barking', 'train'])   # listed but not on disk: skipped
    with open(tmp_path / 'vggsound.csv', 'w', newline='') as f:
        csv.writer(f).writerows(lines)
    pools, shared, skipped = vpo.find_audio(str(tmp_path))
    assert set(pools) == {'dog', 'male'} and not shared and skipped['missing_clips'] == 1
    assert pools['dog']['test'] == [str(tmp_path / 'clips' / 'yt1_000010.flac')] and len(pools['dog']['train']) == 1


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


def test_official_release(tmp_path):
    root = tmp_path / 'VPO'
    m = np.zeros((20, 30), np.uint8)
    m[:, :10], m[:, 20:], m[0, 0] = 3, 5, 255   # car and airplane in one released mask; 255 ignore
    header = 'split,cateName,cateId,img_Id,ann_Ids,vgg_file,audio_pos,multi_instance\n'
    (root / 'VPO-SS').mkdir(parents=True)
    (root / 'VGGSound' / 'audios').mkdir(parents=True)
    (root / 'VPO-SS' / 'vpo_ss_data_stereo.csv').write_text(
        header + 'train,car,3,7,70,abc_000010,0.2,0\nval,male,92,8,80,def_000020,0.7,0\n')
    _png(str(root / 'VPO-SS' / 'mask' / f'{7:012d}_{70:012d}.png'), m)
    _png(str(root / 'VPO-SS' / 'mask' / 'male' / f'{8:012d}_{80:012d}.png'), (m > 0) * 92)   # per-class folder
    for sub in ('MS', 'MSMI'):
        (root / f'VPO-{sub}').mkdir()
    (root / 'VPO-MS' / 'vpo_ms_data_stereo.csv').write_text(
        header + 'train,car,3,9,90,a_000001,0.8,0\ntrain,airplane,5,9,91,b_000002,0.1,0\n')
    _png(str(root / 'VPO-MS' / 'mask' / f'{9:012d}.png'), m)
    (root / 'VPO-MSMI' / 'vpo_msmi_data_stereo.csv').write_text(
        header + 'val,airplane,5,9,91,b_000002,0.1,0\n'
        'val,dog,18,11,110,c_000003,0.3,1\nval,dog,18,11,111,d_000004,0.9,1\n')
    _png(str(root / 'VPO-MSMI' / 'mask' / f'{11:012d}.png'), (m > 0) * 18)
    cache = str(tmp_path / 'cache')
    ss = {p: vpo.read_official(str(root), 'vpo_ss', p, val_frac=0.0, cache=cache, progress=False) for p in vpo.SPLITS}
    assert [len(ss[p]) for p in vpo.SPLITS] == [1, 0, 1] and ss['test'][0]['objects'][0]['cls'] == 'male'
    o = ss['train'][0]['objects'][0]
    assert o == {'cls': 'car', 'ann_id': 70, 'alpha': 0.2, 'area': None, 'sounding': True,
                 'clip': str(root / 'VGGSound' / 'audios' / 'abc_000010.wav')} and ss['train'][0]['inst'] is None
    assert (ss['train'][0]['height'], ss['train'][0]['width']) == (20, 30) and ss['train'][0]['id'] == 'vpo_ss/train/000000'
    label = np.asarray(Image.open(ss['train'][0]['mask']))   # remapped into the cache, as data.py reads it
    assert label[5, 5] == 5 and label[5, 25] == 1 and label[0, 0] == 255 and label[5, 15] == 0   # LUT: car != airplane
    assert np.asarray(Image.open(ss['test'][0]['mask'])).max() == vpo.CLS_INDEX['male']
    msmi = vpo.read_official(str(root), 'msmi', 'test', cache=cache, progress=False)
    assert sorted(len(r['objects']) for r in msmi) == [1, 2]
    assert any(os.sep + 'VPO-MS' + os.sep in r['mask'] for r in msmi)   # multi_instance = 0 lines live in VPO-MS
    with pytest.raises(ValueError, match='split'):
        vpo.read_official(str(root), 'ss', 'dev')
    out = tmp_path / 'conv'
    vpo.convert_official(str(root), str(out), val_frac=0.0, progress=False)
    row = json.loads((out / 'vpo_ms' / 'train.jsonl').read_text())
    label = np.asarray(Image.open(out / row['mask']))
    assert label[5, 5] == 5 and label[5, 25] == 1 and label[0, 0] == 255 and label[5, 15] == 0   # LUT: car != airplane
    assert [o['alpha'] for o in row['objects']] == [0.8, 0.1] and not os.path.isabs(row['objects'][0]['clip'])
    male = json.loads((out / 'vpo_ss' / 'test.jsonl').read_text())
    assert np.asarray(Image.open(out / male['mask'])).max() == vpo.CLS_INDEX['male']


def test_bad_inputs_name_the_path(tmp_path):
    make_audio(str(tmp_path / 'audio'), n=2)
    with pytest.raises(FileNotFoundError, match='nowhere'):
        vpo.build(str(tmp_path / 'nowhere'), str(tmp_path / 'audio'), str(tmp_path / 'out'), progress=False)
    (tmp_path / 'coco').mkdir()
    with pytest.raises(FileNotFoundError, match='instances_val2017.json'):
        vpo.build(str(tmp_path / 'coco'), str(tmp_path / 'audio'), str(tmp_path / 'out'), progress=False)
    with pytest.raises(FileNotFoundError, match='no_audio'):
        vpo.find_audio(str(tmp_path / 'no_audio'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='empty'):
        vpo.find_audio(str(tmp_path / 'empty'))
    with pytest.raises(FileNotFoundError, match='VPO-SS'):
        vpo.read_official(str(tmp_path), 'ss', 'train')
    make_coco(str(tmp_path / 'dup'), n_train=6, n_val=2)
    path = tmp_path / 'dup' / 'annotations' / 'instances_val2017.json'
    val = json.loads(path.read_text())
    for x in val['images'] + val['annotations']:
        x['id' if 'file_name' in x else 'image_id'] -= 1000   # now the same ids as train2017 images
    path.write_text(json.dumps(val))
    with pytest.raises(ValueError, match='both train2017 and val2017'):
        vpo.select(str(tmp_path / 'dup'), str(tmp_path / 'audio'))


def test_cli_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr('sys.argv', ['vpo.py', '--coco', str(tmp_path / 'gone'), '--audio', str(tmp_path),
                                     '--out', str(tmp_path / 'out')])
    with pytest.raises(SystemExit) as e:   # bad input: one line 'error: ...' on stderr, exit status 2
        vpo.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and 'gone' in err and err.count('\n') == 1
    monkeypatch.setattr('sys.argv', ['vpo.py', '--out', str(tmp_path / 'out')])
    with pytest.raises(SystemExit):
        vpo.main()


DOG_DIR, CAT_DIR, ZEBRA_DIR = (vpo.folder_name(vpo.TABLE7[c][0]) for c in ('dog', 'cat', 'zebra'))


def _noise(n, rms, seed=0):
    return (rms * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


@pytest.fixture(scope='module')
def broken(tmp_path_factory):
    """A build from inputs holding broken, silent and unknown files (each would be used if it were sound)."""
    root = tmp_path_factory.mktemp('broken')
    coco, audio = root / 'coco', root / 'audio'
    make_coco(str(coco))
    os.remove(coco / 'annotations' / 'captions_val2017.json')          # val persons cannot be decided
    jpeg = coco / 'train2017' / f'{1:012d}.jpg'
    jpeg.write_bytes(jpeg.read_bytes()[:200])                          # truncated
    Image.new('RGB', (80, 60)).save(coco / 'train2017' / f'{7:012d}.jpg')   # not the annotated 160 x 120
    make_audio(str(audio))
    (audio / DOG_DIR / 'bad0_000000.wav').write_bytes(b'')                 # empty
    sf.write(str(audio / DOG_DIR / 'bad1_000000.flac'), _noise(48000, 0.3), 16000)
    flac = bytearray((audio / DOG_DIR / 'bad1_000000.flac').read_bytes())
    flac[len(flac) // 2:len(flac) // 2 + 2000] = bytes(2000)          # corrupt frames: the header still reads
    (audio / DOG_DIR / 'bad1_000000.flac').write_bytes(bytes(flac))
    sf.write(str(audio / DOG_DIR / 'bad2_000000.wav'), np.zeros(160, np.float32), 16000)   # digital silence
    sf.write(str(audio / CAT_DIR / 'quiet_000000.wav'), _noise(160, 5e-4), 16000)       # 46 dB under the others
    for d in ('playing_piano', 'dog barking'):
        os.makedirs(audio / d)
        sf.write(str(audio / d / 'x_000000.wav'), _noise(160, 0.1), 16000)
    for f in os.listdir(audio / ZEBRA_DIR):
        os.remove(audio / ZEBRA_DIR / f)
    os.rmdir(audio / ZEBRA_DIR)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        vpo.build(str(coco), str(audio), str(root / 'out'), seed=3, val_frac=0.3, workers=2, progress=True)
    out = root / 'out'
    rows = [json.loads(line) for s in vpo.SUBSETS for p in vpo.SPLITS for line in open(out / f'vpo_{s}' / f'{p}.jsonl')]
    return root, rows, json.load(open(out / 'summary.json')), printed.getvalue()


def test_broken_and_silent_clips_are_left_out_and_listed(broken):
    root, rows, summary, printed = broken
    used = {os.path.basename(o['clip']) for r in rows for o in r['objects'] if o['clip']}
    bad = {'bad0_000000.wav', 'bad1_000000.flac', 'bad2_000000.wav', 'quiet_000000.wav'}
    assert not used & bad and any(o['cls'] == 'dog' and o['sounding'] for r in rows for o in r['objects'])
    skipped = summary['skipped']
    names = lambda key: {os.path.basename(p) for p in skipped[key]}
    assert names('broken_clips') == {'bad0_000000.wav', 'bad1_000000.flac'}
    assert names('silent_clips') == {'bad2_000000.wav', 'quiet_000000.wav'}
    assert 'decode' in skipped['broken_clips'][str(root / 'audio' / DOG_DIR / 'bad1_000000.flac')]
    assert 'left out 2 broken clips' in printed and 'left out 2 silent clips' in printed


def test_broken_images_are_left_out_and_listed(broken):
    root, rows, summary, printed = broken
    assert not {1, 7} & {r['image_id'] for r in rows} and {2, 8} <= {r['image_id'] for r in rows}
    bad = summary['skipped']['broken_images']
    assert set(bad) == {str(root / 'coco' / 'train2017' / f'{i:012d}.jpg') for i in (1, 7)}
    assert 'cannot decode' in bad[str(root / 'coco' / 'train2017' / f'{1:012d}.jpg')]
    assert '80x60' in bad[str(root / 'coco' / 'train2017' / f'{7:012d}.jpg')] and 'left out 2 broken images' in printed


def test_unknown_folders_and_missing_captions_are_reported(broken):
    root, rows, summary, printed = broken
    skipped = summary['skipped']
    assert skipped['unknown_audio_folders'] == ['dog barking', 'playing_piano'] and skipped['missing_clips'] == 0
    assert 'playing_piano' in printed and 'meant dog_barking?' in printed
    captions = str(root / 'coco' / 'annotations' / 'captions_val2017.json')
    assert skipped['missing_captions'] == {captions: 6}   # val ids 1001-1012: templates 0, 4, 5 hold a person each
    assert f'no captions file {captions}: its 6 persons' in printed
    assert skipped['classes_without_audio'] == {'zebra': 6}   # template 3: train 3, 9, 15, 21; val 1005, 1011
    assert 'zebra (6 objects cannot sound)' in printed
    assert not any(o['cls'] == 'zebra' and o['sounding'] for r in rows for o in r['objects'])


def _small_inputs(root):
    make_coco(str(root / 'coco'), n_train=6, n_val=2)
    make_audio(str(root / 'audio'), n=2)
    return str(root / 'coco'), str(root / 'audio')


def test_build_refuses_a_nonempty_out_and_is_all_or_nothing(tmp_path, monkeypatch):
    coco, audio = _small_inputs(tmp_path)
    (tmp_path / 'used').mkdir()
    (tmp_path / 'used' / 'mine.txt').write_text('keep')
    with pytest.raises(FileExistsError, match='used.*another --out, or remove it'):
        vpo.build(coco, audio, str(tmp_path / 'used'), workers=1, progress=False)
    assert os.listdir(tmp_path / 'used') == ['mine.txt']

    def interrupted(*args, **kw):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(vpo, '_write_manifests', interrupted)
        with pytest.raises(KeyboardInterrupt):
            vpo.build(coco, audio, str(tmp_path / 'new'), workers=1, progress=False)
    assert not [f for f in os.listdir(tmp_path) if f.startswith('new')]   # neither `new` nor its partial sibling
    (tmp_path / 'empty').mkdir()
    vpo.build(coco, audio, str(tmp_path / 'empty'), workers=1, progress=False)
    assert os.path.isfile(tmp_path / 'empty' / 'meta.json')
    assert sorted(f for f in os.listdir(tmp_path) if 'empty' in f) == ['empty']


def test_cli_needs_out_outside_the_builtin_cache(tmp_path, monkeypatch, capsys):
    gone = ['--coco', str(tmp_path / 'gone'), '--audio', str(tmp_path)]   # never reaches a build
    (tmp_path / 'cache').mkdir()
    (tmp_path / 'cache' / 'builtin.json').write_text('{}')
    repo_data = os.path.join(os.path.dirname(vpo.__file__), 'data', 'real')
    for out, why in (([], '--out is required'), (['--out', repo_data], 'built-in'),
                     (['--out', str(tmp_path / 'cache' / 'vpo')], 'built-in')):
        monkeypatch.setattr('sys.argv', ['vpo.py'] + gone + out)
        with pytest.raises(SystemExit) as e:
            vpo.main()
        assert e.value.code == 2 and why in capsys.readouterr().err


def test_bad_json_names_the_file_and_its_position(tmp_path):
    coco, audio = _small_inputs(tmp_path)
    path = tmp_path / 'coco' / 'annotations' / 'instances_train2017.json'
    raw = path.read_bytes()[:len(path.read_bytes()) * 2 // 3]
    path.write_bytes(raw)
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(raw)
    with pytest.raises(ValueError, match=r'instances_train2017.json: not valid JSON \(truncated\?\)') as e:
        vpo.select(coco, audio)
    assert f'(char {want.value.pos})' in str(e.value)   # the position in the file, not in the polygon-free text
    make_coco(str(tmp_path / 'coco2'), n_train=6, n_val=2)
    (tmp_path / 'coco2' / 'annotations' / 'captions_val2017.json').write_bytes(b'\x89PNG\x00\x01')
    with pytest.raises(ValueError, match=r'captions_val2017.json: not valid JSON'):
        vpo.select(str(tmp_path / 'coco2'), audio)


HEADER = 'split,cateName,cateId,img_Id,ann_Ids,vgg_file,audio_pos,multi_instance\n'


def _release(root, lines, *, audio=True, mask=None):
    """A released VPO-SS holding `lines` (csv rows after the header), masks of image 7 / annotation 70."""
    os.makedirs(root / 'VPO-SS', exist_ok=True)
    (root / 'VPO-SS' / 'vpo_ss_data_stereo.csv').write_text(HEADER + ''.join(line + '\n' for line in lines))
    m = np.zeros((20, 30), np.uint8)
    m[:, :10] = 3
    if mask is None:
        _png(str(root / 'VPO-SS' / 'mask' / f'{7:012d}_{70:012d}.png'), m)
    else:
        os.makedirs(root / 'VPO-SS' / 'mask', exist_ok=True)
        mask.save(root / 'VPO-SS' / 'mask' / f'{7:012d}_{70:012d}.png')
    if audio:
        os.makedirs(root / 'VGGSound' / 'audios', exist_ok=True)
    return str(root)


def _tree_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_release_csv_truncated_or_garbled(tmp_path):
    root = _release(tmp_path / 'VPO', ['train,car,3,7,70,abc_000010,0.2,0', 'train,car,3,7,70,abc_00'])
    with pytest.raises(ValueError, match=r'vpo_ss_data_stereo.csv:3: 6 fields, the header has 8 \(truncated\?\)'):
        vpo.read_official(root, 'ss', 'train', cache=str(tmp_path / 'c'))
    root = _release(tmp_path / 'VPO2', ['train,car,3,seven,70,abc_000010,0.2,0'])
    with pytest.raises(ValueError, match=r"vpo_ss_data_stereo.csv:2: img_Id 'seven' is not a number"):
        vpo.read_official(root, 'ss', 'train', cache=str(tmp_path / 'c'))


def test_release_is_only_read_and_masks_go_to_our_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vpo, 'OFFICIAL_CACHE', str(tmp_path / 'ours'))
    root = _release(tmp_path / 'a' / 'VPO', ['train,car,3,7,70,abc_000010,0.2,0'])
    before = _tree_files(root)
    rows = vpo.read_official(root, 'ss', 'train', val_frac=0.0)
    rows = vpo.read_official(root, 'ss', 'train', val_frac=0.0)
    assert _tree_files(root) == before   # nothing written into the release
    cache = vpo.official_cache(root)
    assert rows[0]['mask'].startswith(cache + os.sep) and cache.startswith(str(tmp_path / 'ours'))
    assert np.asarray(Image.open(rows[0]['mask']))[0, 0] == vpo.CLS_INDEX['car']
    assert capsys.readouterr().out.count(cache) == 1   # its place said once
    other = _release(tmp_path / 'b' / 'VPO', ['train,car,3,7,70,abc_000010,0.2,0'])
    assert vpo.official_cache(other) != cache   # same folder name, another release


def test_palette_masks_keep_their_ids_and_rgb_is_refused(tmp_path):
    ids = np.zeros((4, 6), np.uint8)
    ids[:, :3], ids[:, 3:] = 3, 92   # car, male
    pal = Image.fromarray(ids, 'P')
    pal.putpalette([250, 250, 250] * 256)   # every index looks the same: only the index holds the id
    pal.save(tmp_path / 'p.png')
    vpo._remap_official(str(tmp_path / 'p.png'), str(tmp_path / 'out.png'))
    got = np.asarray(Image.open(tmp_path / 'out.png'))
    assert (got[:, :3] == vpo.CLS_INDEX['car']).all() and (got[:, 3:] == vpo.CLS_INDEX['male']).all()
    Image.fromarray(np.stack([ids] * 3, -1)).save(tmp_path / 'rgb.png')
    with pytest.raises(ValueError, match=r'rgb.png: mask of mode RGB holds colours, not ids'):
        vpo._remap_official(str(tmp_path / 'rgb.png'), str(tmp_path / 'out2.png'))


def test_release_audio_in_the_authors_layout(tmp_path):
    root = _release(tmp_path / 'datasets' / 'VPO', ['train,car,3,7,70,abc_000010,0.2,0'], audio=False)
    with pytest.raises(FileNotFoundError, match='VPO/VGGSound/audios nor .*datasets/vggsound_bench/VGGSound/audios'):
        vpo.read_official(root, 'ss', 'train', val_frac=0.0, cache=str(tmp_path / 'c'))
    bench = tmp_path / 'datasets' / 'vggsound_bench' / 'VGGSound' / 'audios'   # the authors' config/config_vpo_ss.py
    os.makedirs(bench)
    rows = vpo.read_official(root, 'ss', 'train', val_frac=0.0, cache=str(tmp_path / 'c'))
    assert rows[0]['objects'][0]['clip'] == str(bench / 'abc_000010.wav')
    os.makedirs(tmp_path / 'mine' / 'audios')
    rows = vpo.read_official(root, 'ss', 'train', audio=str(tmp_path / 'mine'), val_frac=0.0, cache=str(tmp_path / 'c'))
    assert rows[0]['objects'][0]['clip'] == str(tmp_path / 'mine' / 'audios' / 'abc_000010.wav')


@pytest.mark.parametrize('name', ['../../../etc/passwd', '/etc/passwd', 'sub/../../x'])
def test_release_file_names_stay_inside(tmp_path, name):
    root = _release(tmp_path / 'VPO', [f'train,car,3,7,70,{name},0.2,0'])
    with pytest.raises(ValueError, match=rf'vpo_ss_data_stereo.csv:2: vgg_file: file name '
                                         rf'{re.escape(repr(name + ".wav"))} is absolute or leaves'):
        vpo.read_official(root, 'ss', 'train', cache=str(tmp_path / 'c'))
    root = _release(tmp_path / 'VPO', ['train,car,3,7,70,sub/../abc_000010,0.2,0'])   # stays inside: fine
    assert vpo.read_official(root, 'ss', 'train', val_frac=0.0, cache=str(tmp_path / 'c'))


@pytest.mark.parametrize('module', [vpo, data, model, loss, train, ev])
def test_module_reads_beside_the_paper(module):
    """Every module fits a reader: lines of at most 120 characters, functions of at most 80 lines, and no word
    about how the code came to be."""
    text = open(module.__file__).read()
    assert max(map(len, text.splitlines())) <= 120
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80]
    assert not long
    assert not re.search(r'\bissue\b|NOTES|SPEC\.md|session \d', text)


# ====================================================================================================
# Sec. 3, App. B.1: the built-in offline source, the VPO Dataset and its transforms (data.py)
# ====================================================================================================

def test_builtin_is_deterministic_and_reused(builtin, tmp_path):
    out = data.ensure_builtin(str(tmp_path), n_train=30, n_val=10, clips_per_class=3, progress=False)
    for sub in data.VPO_SUBSETS:
        for split in ('train', 'val', 'test'):
            a = open(os.path.join(builtin, sub, f'{split}.jsonl'), 'rb').read()
            b = open(os.path.join(out, sub, f'{split}.jsonl'), 'rb').read()
            assert a == b, (sub, split)
    stamp = os.path.getmtime(os.path.join(out, 'meta.json'))
    data.ensure_builtin(str(tmp_path), n_train=30, n_val=10, clips_per_class=3, progress=False)
    assert os.path.getmtime(os.path.join(out, 'meta.json')) == stamp   # reused, not rebuilt


def test_builtin_files_do_not_depend_on_worker_count(tmp_path):
    """Each image and clip has its own seed: one process and two write the same content (an ogg file's bytes
    differ between any two writes, its stream serial number is random; its samples do not)."""
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    data.make_builtin(one, n_train=6, n_val=2, clips_per_class=2, workers=1, progress=False)
    data.make_builtin(two, n_train=6, n_val=2, clips_per_class=2, workers=2, progress=False)
    files = sorted(os.path.relpath(os.path.join(d, f), one) for d, _, fs in os.walk(one) for f in fs)
    assert files == sorted(os.path.relpath(os.path.join(d, f), two) for d, _, fs in os.walk(two) for f in fs)
    assert sum(f.endswith('.ogg') for f in files) and sum(f.endswith('.jpg') for f in files) == 8
    for f in files:
        a, b = os.path.join(one, f), os.path.join(two, f)
        if f.endswith('.ogg'):
            assert np.array_equal(sf.read(a)[0], sf.read(b)[0]), f
        else:
            assert open(a, 'rb').read() == open(b, 'rb').read(), f


def _draws(draw, n=60):
    """Non-crowd annotations of n images drawn for `draw`: [(W, [(category_id, centre x / W), ...]), ...]."""
    cat_ids = {**{c: vpo.COCO_IDS[c] for c in data.LOOKS}, **data.DISTRACTORS}
    out = []
    for i in range(1, n + 1):
        pixels, anns, _ = data._make_image(i, data._stream(0, draw, 0, i), cat_ids, None, draw)
        W = pixels.shape[1]
        out.append((W, [(a['category_id'], (a['bbox'][0] + a['bbox'][2] / 2) / W) for a in anns if not a['iscrowd']
                        and a['category_id'] not in data.DISTRACTORS.values()]))
    return out


def test_each_subset_draws_its_own_miniature():
    """vpo_ss keeps its original random streams (its numbers stay comparable); vpo_ms draws 3-5 classes, none twice;
    vpo_msmi draws 2 instances of one class, one on each side (alpha < 0.4 and > 0.6), in every image."""
    assert data._stream(3, 'vpo_ss', 0, 5).random() == np.random.default_rng([3, 0, 5]).random()
    assert data._stream(3, 'vpo_ms', 0, 5).random() != data._stream(3, 'vpo_msmi', 0, 5).random()
    ss = _draws('vpo_ss')
    assert 0.15 < np.mean([len(a) != len({c for c, _ in a}) for _, a in ss]) < 0.6      # a third multi-instance
    ms = _draws('vpo_ms')
    assert all(len(a) == len({c for c, _ in a}) for _, a in ms) and np.mean([len(a) >= 3 for _, a in ms]) > 0.8
    alphas, gaps = [], []
    for _, a in _draws('vpo_msmi'):
        by = {}
        for c, x in a:
            by.setdefault(c, []).append(x)
        multi = [xs for xs in by.values() if len(xs) >= 2]
        assert len(multi) <= 1 and all(len(xs) == 2 for xs in multi)
        if not multi:        # an instance found no room (30 tries)
            continue
        xs = sorted(multi[0])
        gaps.append(min(np.diff(xs)))                 # bbox centres: a rotated shape's can sit off its centre
        alphas += xs
    assert len(gaps) > 0.75 * 60 and np.mean(np.array(gaps) >= vpo.ALPHA_GAP) > 0.9     # most find room
    alphas = np.array(alphas)
    assert alphas.min() < 0.25 and alphas.max() > 0.75 and np.mean((alphas > 0.42) & (alphas < 0.58)) < 0.05


def test_builtin_formats(builtin):
    root = os.path.dirname(builtin)
    coco = json.load(open(os.path.join(root, 'coco', 'annotations', 'instances_train2017.json')))
    kinds = {type(a['segmentation']).__name__ for a in coco['annotations']}
    assert 'list' in kinds                                          # polygons
    assert {c['name'] for c in coco['categories']} >= {'person', 'dog', 'chair'}
    sizes = {(im['width'], im['height']) for im in coco['images']}
    assert len(sizes) > 5                                            # varied image sizes
    rates, chans = set(), set()
    for folder in os.listdir(os.path.join(root, 'audio')):
        for f in os.listdir(os.path.join(root, 'audio', folder)):
            info = sf.info(os.path.join(root, 'audio', folder, f))
            rates.add(info.samplerate)
            chans.add(info.channels)
    assert rates == {16000, 22050, 44100} and chans == {1, 2}
    assert 'male_speech_man_speaking' in os.listdir(os.path.join(root, 'audio'))


def test_every_builtin_image_needs_the_audio(builtin):
    for sub in ('vpo_ss', 'vpo_ms'):
        for split in ('train', 'test'):
            for row in data.VPODataset(builtin, sub, split).rows:
                assert len({o['cls'] for o in row['objects']}) >= 2


def test_splits_disjoint(builtin):
    for sub in data.VPO_SUBSETS:
        ids = [{r['image_id'] for r in data.VPODataset(builtin, sub, s).rows} for s in ('train', 'val', 'test')]
        assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_alpha_is_centre_of_mass(builtin):
    ds = data.VPODataset(builtin, 'vpo_msmi', 'test')
    for row in ds.rows[:5]:
        inst = np.asarray(Image.open(os.path.join(builtin, row['inst'])))
        for k, o in enumerate(row['objects']):
            xs = np.nonzero(inst == k + 1)[1]
            assert abs((xs.mean() + 0.5) / inst.shape[1] - o['alpha']) < 0.02


def test_sample_shapes_and_labels(builtin):
    ds = data.VPODataset(builtin, 'vpo_ms', 'train', train=True, crop=64, audio_seconds=1.0)
    s = ds[(0, 0)]
    assert s['image'].shape == (3, 64, 64) and s['label'].shape == (64, 64)
    assert s['audio'].shape == (2, 100, 64) and s['wave'].shape == (2, 16000)
    assert set(s['label'].unique().tolist()) <= set(range(22)) | {255}
    want = {vpo.VPO_CLASSES.index(o['cls']) for o in ds.rows[0]['objects'] if o['sounding']}
    assert set(s['t'].nonzero()[:, 0].tolist()) == want
    assert torch.equal(ds[(3, 1)]['image'], ds[(3, 1)]['image'])          # (seed, epoch, index) decides
    assert not torch.equal(ds[(3, 1)]['image'], ds[(4, 1)]['image'])
    mono = data.VPODataset(builtin, 'vpo_ms', 'train', train=True, crop=64, audio_seconds=3.0, mono=True)[(0, 0)]
    assert mono['audio'].shape == (1, 300, 64)


def test_flip_mirrors_mask_and_swaps_channels(builtin):
    ds = data.VPODataset(builtin, 'vpo_ss', 'test', audio_seconds=1.0)
    a, b = ds.load(0), ds.load(0, flip=True)
    assert torch.equal(b['label'], a['label'].flip(-1)) and torch.allclose(b['image'], a['image'].flip(-1))
    assert torch.allclose(b['wave'], a['wave'].flip(0), atol=1e-6)      # alpha -> 1 - alpha swaps L and R
    alpha = next(o['alpha'] for o in ds.rows[0]['objects'] if o['sounding'])
    left, right = a['wave'].abs().sum(1)
    assert (left > right) == (alpha < 0.5)


def test_probe_loads(builtin):
    ds = data.VPODataset(builtin, 'vpo_ss', 'test', audio_seconds=1.0)
    row = ds.rows[0]
    k = next(k for k, o in enumerate(row['objects']) if not o['sounding'])
    s = ds.load(0, sounding=[k])
    assert set(s['label'].unique().tolist()) - {0, 255} == {vpo.VPO_CLASSES.index(row['objects'][k]['cls'])}
    silent = ds.load(0, audio='silence')
    assert torch.isfinite(silent['audio']).all() and silent['wave'].abs().sum() == 0
    assert torch.allclose(ds.load(0, swap=True)['wave'], ds.load(0)['wave'].flip(0))


def test_test_scale_rescales_the_image_not_the_label(builtin):
    full = data.VPODataset(builtin, 'vpo_ss', 'test', audio_seconds=1.0)
    half = data.VPODataset(builtin, 'vpo_ss', 'test', audio_seconds=1.0, test_scale=0.5)
    a, b = full[0], half[0]
    H, W = a['label'].shape
    assert a['image'].shape[-2:] == (H, W) and b['image'].shape[-2:] == (round(H / 2), round(W / 2))
    assert torch.equal(a['label'], b['label']) and torch.equal(a['audio'], b['audio'])
    assert half.load(0, audio='silence')['image'].shape == b['image'].shape   # probes see the same scale
    train_half = data.VPODataset(builtin, 'vpo_ss', 'train', train=True, crop=48, audio_seconds=1.0, test_scale=0.5)
    assert train_half[(0, 0)]['image'].shape[-2:] == (48, 48)                  # training crops are unaffected
    with pytest.raises(ValueError, match='test_scale=0'):
        data.VPODataset(builtin, 'vpo_ss', 'test', test_scale=0)
    with pytest.raises(ValueError, match='test_scale=0.5.*AVSBench'):
        data.build_dataset('s4', '/nowhere', 'test', test_scale=0.5)


def test_normalise_is_imagenet_normalisation():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8))
    ref = (np.asarray(img, np.float32) / 255 - data.MEAN) / data.STD                     # H, W, 3
    x = data.normalise(img)
    assert x.shape == (3, 7, 9) and x.is_contiguous() and torch.equal(x, torch.from_numpy(ref).permute(2, 0, 1))


def test_read_clip_any_rate_channels_length(tmp_path):
    t = np.arange(22050) / 22050
    sf.write(tmp_path / 'a.flac', np.sin(2 * np.pi * 440 * t), 22050)                 # 1 s mono flac
    sf.write(tmp_path / 'b.wav', np.stack([t * 0, t * 0], 1)[:20000] + 0.1, 44100)   # short stereo wav
    sf.write(tmp_path / 'c.ogg', np.sin(2 * np.pi * 300 * np.arange(48000) / 16000), 16000)
    sf.write(tmp_path / 'd.wav', np.zeros(1000), 16000)                               # silent and short
    for name in ('a.flac', 'b.wav', 'c.ogg', 'd.wav'):
        w = data.read_clip(str(tmp_path / name), 3.0)
        assert w.shape == (48000,) and np.isfinite(w).all()
        assert torch.isfinite(data.logmel(torch.from_numpy(w))).all()
    w = data.read_clip(str(tmp_path / 'a.flac'), 3.0)
    assert np.allclose(w[:16000], w[16000:32000], atol=1e-4)                        # tiled


def test_bad_files_are_named(builtin, tmp_path):
    bad = tmp_path / 'bad.wav'
    bad.write_bytes(b'not a wav at all')
    with pytest.raises(RuntimeError, match='bad.wav'):
        data.read_clip(str(bad), 1.0)
    ds = data.VPODataset(builtin, 'vpo_ss', 'test', audio_seconds=1.0)
    rows = [dict(ds.rows[0], image=str(tmp_path / 'missing.jpg'))]
    with pytest.raises(RuntimeError, match='missing.jpg.*test.jsonl:1'):
        data.VPODataset(builtin, 'vpo_ss', 'test', rows=rows)[0]
    rows = [dict(ds.rows[0], objects=[dict(ds.rows[0]['objects'][0], cls='unicorn')])]
    with pytest.raises(ValueError, match="unicorn.*airplane"):
        data.VPODataset(builtin, 'vpo_ss', 'test', rows=rows)
    (tmp_path / 'junk').mkdir()
    (tmp_path / 'junk' / 'x.txt').write_text('x')
    with pytest.raises(FileNotFoundError, match='junk'):
        data.build_dataset('vpo_ss', str(tmp_path / 'junk'), 'test')
    with pytest.raises(ValueError, match='vpo_ss'):
        data.build_dataset('vpo_xx', builtin, 'test')


def _refuse_generation(monkeypatch):
    """make_builtin raises, so a test sees generation instead of waiting for it; returns the roots asked for."""
    asked = []

    def refuse(root, **kw):
        asked.append(root)
        raise AssertionError(f'generated a built-in source in {root}')
    monkeypatch.setattr(data, 'make_builtin', refuse)
    return asked


def _vpo_folder(path, manifest_lines, subset='vpo_ss', split='test', meta='{}'):
    """A hand-made VPO folder: meta.json and one manifest; every other split of the subset empty."""
    os.makedirs(os.path.join(path, subset))
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        f.write(meta)
    for s in ('train', 'val', 'test'):
        with open(os.path.join(path, subset, f'{s}.jsonl'), 'w') as f:
            f.write(''.join(line + '\n' for line in manifest_lines) if s == split else '')
    return str(path)


def test_a_given_root_must_exist_and_be_a_known_source(builtin, tmp_path, monkeypatch):
    asked = _refuse_generation(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r'--root \S*typo does not exist: expected a VPO folder'):
        data.resolve_root('vpo_ss', str(tmp_path / 'typo'))
    assert not (tmp_path / 'typo').exists()
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match=r'--root \S*empty is empty.*builtin.json'):
        data.build_dataset('vpo_ss', str(tmp_path / 'empty'), 'test')
    assert os.listdir(tmp_path / 'empty') == [] and asked == []
    # the accepted ones: a built-in cache and its vpo/ child, a vpo.py folder, the official release
    cache = os.path.dirname(builtin)
    assert data.resolve_root('vpo_ss', cache) == (builtin, 'builtin')
    assert data.resolve_root('vpo_ss', builtin) == (builtin, 'builtin')
    assert data.resolve_root('vpo_ss', _vpo_folder(tmp_path / 'mine', [])) == (str(tmp_path / 'mine'), 'vpo')
    (tmp_path / 'release' / 'VPO-MS').mkdir(parents=True)
    assert data.resolve_root('vpo_ms', str(tmp_path / 'release')) == (str(tmp_path / 'release'), 'official')
    # no root: the default cache, one folder per data seed
    monkeypatch.setattr(data, 'HERE', str(tmp_path / 'code'))
    for name, seed, where in (('vpo_ss', 0, 'data'), ('vpo_ss', 2, 'data/seed2'), ('vpo_ms', 0, 'data/vpo_ms'),
                              ('vpo_msmi', 3, 'data/vpo_msmi/seed3')):
        with pytest.raises(AssertionError, match='generated'):
            data.resolve_root(name, None, data_seed=seed, progress=False)
        assert asked[-1] == str(tmp_path / 'code' / where)


def test_cli_names_a_bad_root_in_one_line(tmp_path, monkeypatch, capsys):
    _refuse_generation(monkeypatch)
    monkeypatch.setattr('sys.argv', ['data.py', '--data', 'vpo_ss', '--root', str(tmp_path / 'typo')])
    with pytest.raises(SystemExit) as e:
        data.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: --root') and 'typo' in err and err.count('\n') == 1


def test_preview_of_an_empty_split_says_so(tmp_path, monkeypatch, capsys):
    root = _vpo_folder(tmp_path / 'v', [], subset='vpo_ms', split='train')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr('sys.argv', ['data.py', '--data', 'vpo_ms', '--root', root])
    with pytest.raises(SystemExit) as e:
        data.main()
    out, err = capsys.readouterr()
    assert e.value.code == 2 and 'vpo_ms train: 0 samples' in out
    assert err.strip() == 'error: vpo_ms train has no samples: nothing to preview'
    assert not list(tmp_path.glob('*.png'))


def test_training_seed_varies_augmentation_not_the_builtin_data(builtin):
    cache = os.path.dirname(builtin)
    stamp = os.path.getmtime(os.path.join(cache, 'builtin.json'))
    kw = dict(train=True, crop=32, audio_seconds=0.5, data_seed=0)
    a = data.build_dataset('vpo_ss', cache, 'train', seed=0, **kw)
    b = data.build_dataset('vpo_ss', cache, 'train', seed=7, **kw)
    assert os.path.getmtime(os.path.join(cache, 'builtin.json')) == stamp        # not regenerated
    assert a.root == b.root == builtin and a.rows == b.rows and b.seed == 7
    assert not torch.equal(a[(0, 0)]['image'], b[(0, 0)]['image'])              # the augmentation differs
    assert data.resolve_root('vpo_ss', cache, data_seed=0, progress=False) == (builtin, 'builtin')


def _ensure_counting(root, marks, barrier):
    """Child process: count this process's generations in `marks`, start with the other, build the cache."""
    make = data.make_builtin

    def counted(*args, **kw):
        open(os.path.join(marks, str(os.getpid())), 'w').close()
        return make(*args, **kw)
    data.make_builtin = counted
    barrier.wait()
    data.ensure_builtin(root, n_train=6, n_val=2, clips_per_class=2, progress=False)


def test_two_processes_share_one_generation(tmp_path):
    """Started together on one fresh root, one process generates under the lock, the other waits and uses it;
    the result is the single build's."""
    ctx = multiprocessing.get_context('fork')
    barrier, marks = ctx.Barrier(2), tmp_path / 'marks'
    marks.mkdir()
    procs = [ctx.Process(target=_ensure_counting, args=(str(tmp_path / 'both'), str(marks), barrier))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(os.listdir(marks)) == 1                                            # generated once
    one = data.ensure_builtin(str(tmp_path / 'one'), n_train=6, n_val=2, clips_per_class=2, progress=False)
    both = str(tmp_path / 'both' / 'vpo')
    files = sorted(os.path.relpath(os.path.join(d, f), one) for d, _, fs in os.walk(one) for f in fs)
    assert files == sorted(os.path.relpath(os.path.join(d, f), both) for d, _, fs in os.walk(both) for f in fs)
    for f in files:
        assert open(os.path.join(one, f), 'rb').read() == open(os.path.join(both, f), 'rb').read(), f
    assert open(tmp_path / 'one' / 'builtin.json').read() == open(tmp_path / 'both' / 'builtin.json').read()


def _label2idx(root, mapping):
    with open(os.path.join(root, 'label2idx.json'), 'w') as f:
        json.dump(mapping, f)


def test_avss_label2idx_numbered_from_one(avss_root, tmp_path):
    ref = data.AVSBenchDataset(avss_root, 'avss', 'test')
    root = str(tmp_path / 'AVSS')
    shutil.copytree(avss_root, root)
    _label2idx(root, {n: j + 1 for j, n in enumerate(ref.classes)})                 # background = 1
    ds = data.AVSBenchDataset(root, 'avss', 'test')
    assert ds.classes == ref.classes and torch.equal(ds[6]['label'], ref[6]['label'])
    for bad in ({n: j + 2 for j, n in enumerate(ref.classes)},                     # from 2
                {'dog': 1, 'background': 2}, {'background': 0, 'dog': 2}):
        _label2idx(root, bad)
        with pytest.raises(ValueError, match='label2idx.json: indices must be'):
            data.AVSBenchDataset(root, 'avss', 'test')


def test_damaged_json_names_the_file(builtin, avss_root, tmp_path):
    good = open(os.path.join(builtin, 'vpo_ss', 'test.jsonl')).readline().strip()
    root = _vpo_folder(tmp_path / 'cut', [good, good[:40]])                        # a truncated last line
    with pytest.raises(ValueError, match=r'test.jsonl:2: not a JSON line'):
        data.VPODataset(root, 'vpo_ss', 'test')
    root = _vpo_folder(tmp_path / 'meta', [], meta='{"itd": tr')
    with pytest.raises(ValueError, match=r'meta.json: not valid JSON'):
        data.VPODataset(root, 'vpo_ss', 'test')
    avss = str(tmp_path / 'AVSS')
    shutil.copytree(avss_root, avss)
    with open(os.path.join(avss, 'label2idx.json'), 'w') as f:
        f.write('{"background": 0, "dog"')
    with pytest.raises(ValueError, match=r'label2idx.json: not valid JSON'):
        data.AVSBenchDataset(avss, 'avss', 'test')


def test_manifest_and_csv_names_stay_inside_their_folder(builtin, tmp_path):
    row = json.loads(open(os.path.join(builtin, 'vpo_ss', 'test.jsonl')).readline())
    for n, bad in enumerate(('../../outside.png', '/etc/passwd', 'vpo_ss/../../x.png')):
        for key in ('mask', 'inst'):
            root = str(tmp_path / f'{key}{n}')
            _vpo_folder(root, [json.dumps(dict(row, **{key: bad}))])
            with pytest.raises(ValueError, match=rf'test.jsonl:1: file name {bad!r} is absolute or leaves'):
                data.VPODataset(root, 'vpo_ss', 'test')
    csvs = {'s4': ('s4_meta_data.csv', ['name', 'start', 'category', 'split']),
            'ms3': ('ms3_meta_data.csv', ['video_id', 'split']),
            'avss': ('metadata.csv', ['vid', 'uid', 's_min', 's_sec', 'a_obj', 'split', 'label'])}
    for name, (fname, header) in csvs.items():
        for n, bad in enumerate(('../../../x', '/abs/x', 'a/../../x')):
            root = tmp_path / f'{name}{n}'
            root.mkdir()
            if name == 'avss':
                _label2idx(str(root), {'background': 0, 'dog': 1})
            values = {'name': bad, 'video_id': bad, 'uid': bad, 'category': 'cat', 'split': 'test', 'label': 'v2'}
            _csv(str(root / fname), header, [[values.get(h, 0) for h in header]])
            with pytest.raises(ValueError, match=rf'{fname} line 2.*file name \S*{bad!r} is absolute or leaves'):
                data.AVSBenchDataset(str(root), name, 'test')
    # the category folder of S4 is a name too
    root = tmp_path / 's4cat'
    root.mkdir()
    _csv(str(root / 's4_meta_data.csv'), csvs['s4'][1], [['v', 0, '..', 'test']])
    with pytest.raises(ValueError, match=r"file name '\.\.' is absolute or leaves"):
        data.AVSBenchDataset(str(root), 's4', 'test')


def _rows_with_mask(ds, path):
    return [dict(ds.rows[0], mask=str(path))]


def test_id_masks_are_read_by_value_whatever_the_mode(builtin, tmp_path):
    """A palette PNG stores ids as its indices: read as brightness, id 1 of the VOC colours becomes 38."""
    kw = dict(crop=48, audio_seconds=0.5)
    ref = data.VPODataset(builtin, 'vpo_ss', 'test', **kw)
    ids = np.asarray(Image.open(os.path.join(builtin, ref.rows[0]['mask'])))
    assert set(np.unique(ids)) - {0, 255}                                        # a sounding object
    pm = Image.fromarray(ids, 'P')
    pm.putpalette(data.palette(256).flatten().tolist())
    pm.save(tmp_path / 'p.png')
    Image.fromarray(ids.astype(np.uint16)).save(tmp_path / 'i16.png')
    for name in ('p.png', 'i16.png'):
        for augment in (False, True):
            a = data.VPODataset(builtin, 'vpo_ss', 'test', train=augment, **kw)
            rows = _rows_with_mask(ref, tmp_path / name)
            b = data.VPODataset(builtin, 'vpo_ss', 'test', train=augment, rows=rows, **kw)
            assert torch.equal(a[(0, 0)]['label'], b[(0, 0)]['label']), (name, augment)
    Image.fromarray(data.palette(256)[ids]).save(tmp_path / 'rgb.png')
    with pytest.raises(ValueError, match=r'rgb.png: mask of mode RGB holds colours, not ids.*test.jsonl:1'):
        data.VPODataset(builtin, 'vpo_ss', 'test', rows=_rows_with_mask(ref, tmp_path / 'rgb.png'))[0]
    Image.fromarray((ids.astype(np.uint16) * 300)).save(tmp_path / 'big.png')
    with pytest.raises(ValueError, match=r'big.png: mask values 0\.\.\d+ do not fit ids 0\.\.255'):
        data.VPODataset(builtin, 'vpo_ss', 'test', rows=_rows_with_mask(ref, tmp_path / 'big.png'))[0]


def test_palette_is_the_voc_colour_map():
    pal = data.palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8 and len({tuple(c) for c in pal}) == 256
    voc = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 8: (64, 0, 0), 15: (192, 128, 128),
           20: (0, 64, 128), 255: (224, 224, 192)}
    assert all(tuple(pal[k]) == c for k, c in voc.items())
    assert np.array_equal(data.palette(71), pal[:71])


# ====================================================================================================
# Sec. 4.1: backbones, DeepLabV3+, the cross-attention f_CA (model.py)
# ====================================================================================================

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One intra-op thread: on the shared 2-core box a busy neighbour stalls OpenMP's barriers (measured: this file
    took 85 s with 2 threads under load, 21 s with 1). Restored afterwards, for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return CAVP(**{'backbone': 'resnet18', **kw})


@functools.lru_cache(maxsize=None)
def model_built(attn='sigmoid', os_=8):
    """Shared eval-mode models (building one costs about as much as the tests that use it); never mutate them."""
    return tiny(attn=attn, output_stride=os_).eval()


def inputs(b=2, size=32, a_channels=2, frames=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.randn(b, a_channels, frames, 64, generator=g)


def trunk_forward(net, x):
    return net.layer4(net.layer3(net.layer2(net.layer1(model.stem(net, x)))))


@pytest.mark.parametrize('os_', [8, 16])
@pytest.mark.parametrize('attn', ATTN)
def test_shapes_every_variant(attn, os_):
    m = model_built(attn, os_)
    x, a = inputs()
    with torch.no_grad():
        out = m(x, a)
    assert out['logits'].shape == (2, 22, 32, 32)
    assert out['z'].shape == (2, 304, 8, 8)
    assert out['attn'].shape == (2, 4, 8, 8)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_resnet50_mono_shapes():
    m = tiny(backbone='resnet50', audio_channels=1, num_classes=5).eval()
    x, a = inputs(b=1, size=48, a_channels=1, frames=100)
    with torch.no_grad():
        out = m(x, a)
    assert out['logits'].shape == (1, 5, 48, 48) and out['z'].shape == (1, 304, 12, 12)


@pytest.mark.parametrize('arch', ['resnet10', 'resnet18', 'resnet50'])
@pytest.mark.parametrize('os_', [8, 16])
def test_dilation_is_a_trous(arch, os_):
    """Dilated trunk sampled every 32/os pixels == the plain stride-32 trunk with the same weights."""
    torch.manual_seed(0)
    plain = model.resnet_trunk(arch).eval()
    dilated = model.dilate(copy.deepcopy(plain), os_)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y, yd = trunk_forward(plain, x), trunk_forward(dilated, x)
    assert yd.shape[-1] == 64 // os_
    k = 32 // os_
    torch.testing.assert_close(yd[..., ::k, ::k], y, atol=1e-4, rtol=1e-4)


def test_bottleneck_dilation_equals_torchvision():
    tv = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    ours = model.resnet_trunk('resnet50', output_stride=8).eval()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith('fc.')})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(trunk_forward(ours, x), trunk_forward(tv, x))
    with pytest.raises(NotImplementedError):  # why resnet_trunk dilates by hand
        torchvision.models.resnet18(replace_stride_with_dilation=[False, True, True])


def folded_fca(f, u_v, u_a, attn):
    """f_CA through the one-audio-token identities, computed independently of model.py's plain form:
    q_h . k_h = t . (W_q,h^T k_h) (the key mapped back to pixel space once per sample) and
    W_o [a_h v_h]_h = sum_h a_h (W_o,h v_h); for 'tpavi' the audio query is folded into the pixel keys."""
    B, D, h, w = u_v.shape
    H, d, N = f.heads, D // f.heads, h * w
    t = u_v.permute(0, 2, 3, 1).reshape(B, N, D)                                      # B, N, D
    s = f.norm_a(u_a)                                                                  # B, D
    if attn == 'tpavi':
        q = f.q(s).view(B, H, d)
        w_k = torch.einsum('bhe,hec->bhc', q, f.k.weight.view(H, d, D)) / d ** 0.5     # B, H, D
        a = (w_k @ t.transpose(1, 2)).softmax(-1)                                      # B, H, N
        fv = torch.einsum('bhc,hec->bhe', a @ t, f.v.weight.view(H, d, D))             # B, H, d
        u_hat = t + t * f.o(fv.reshape(B, D))[:, None]
    else:
        k, v = f.k(s).view(B, H, d), f.v(s).view(B, H, d)
        w_q = torch.einsum('bhe,hec->bhc', k, f.q.weight.view(H, d, D)) / d ** 0.5     # B, H, D
        logits = w_q @ t.transpose(1, 2)                                               # B, H, N
        if attn == 'sigmoid':
            a = logits.sigmoid()
        elif attn == 'softmax':
            a = logits.softmax(-1)
        else:
            lo, hi = logits.amin(-1, keepdim=True), logits.amax(-1, keepdim=True)
            a = (logits - lo) / (hi - lo)
        o_v = torch.einsum('bhe,che->bhc', v, f.o.weight.view(D, H, d))                # B, H, D
        u_hat = t + a.transpose(1, 2) @ o_v + f.o.bias
    z = f.norm(u_hat + f.mlp(u_hat))                                                   # B, N, D
    return z.view(B, h, w, D).permute(0, 3, 1, 2), a.reshape(B, H, h, w)


@pytest.mark.parametrize('attn', ['sigmoid', 'softmax', 'minmax', 'tpavi'])
def test_plain_attention_equals_the_folded_identity(attn):
    torch.manual_seed(0)
    f = model.CrossAttention(dim=64, heads=4, attn=attn)
    u_v, u_a = torch.randn(2, 64, 5, 7) * 3, torch.randn(2, 64)
    z, a = f(u_v, u_a)
    z_ref, a_ref = folded_fca(f, u_v, u_a, attn)
    torch.testing.assert_close(a, a_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)


def test_channel_attention_is_spatially_uniform_gain():
    torch.manual_seed(0)
    f = model.CrossAttention(dim=64, heads=4, attn='channel')
    assert not hasattr(f, 'q') and not hasattr(f, 'k')
    u_v, u_a = torch.randn(2, 64, 5, 7), torch.randn(2, 64)
    z, a = f(u_v, u_a)
    t = u_v.permute(0, 2, 3, 1)
    u_hat = t * (1 + f.o(f.v(f.norm_a(u_a))))[:, None, None]
    torch.testing.assert_close(z, f.norm(u_hat + f.mlp(u_hat)).permute(0, 3, 1, 2))
    assert (a == 1).all()


def test_sigmoid_is_per_pixel_softmax_sums_to_one_over_pixels():
    torch.manual_seed(0)
    u_v, u_a = torch.randn(2, 64, 8, 8) * 3, torch.randn(2, 64)
    crop = (..., slice(0, 4), slice(0, 4))
    maps = {}
    for attn in ('sigmoid', 'softmax', 'minmax', 'tpavi'):
        torch.manual_seed(0)
        f = model.CrossAttention(dim=64, heads=4, attn=attn)
        (z, a), (z_crop, a_crop) = f(u_v, u_a), f(u_v[crop], u_a)
        maps[attn] = (a, z[crop], a[crop], z_crop, a_crop)
    a, z_part, a_part, z_crop, a_crop = maps['sigmoid']
    sums = a.sum((2, 3))
    assert ((a > 0) & (a < 1)).all()
    assert (sums - 1).abs().min() > 1 and sums.std() > 0.1  # not normalised over pixels, varies per sample/head
    # sigmoid weighs each pixel on its own: a crop's attention and features do not depend on the other pixels
    torch.testing.assert_close(a_crop, a_part)
    torch.testing.assert_close(z_crop, z_part, atol=1e-5, rtol=1e-5)
    for attn in ('softmax', 'tpavi'):  # normalised over pixels, which breaks that locality
        a, z_part, a_part, z_crop, a_crop = maps[attn]
        torch.testing.assert_close(a.sum((2, 3)), torch.ones(2, 4))
        assert not torch.allclose(a_crop, a_part, atol=1e-3)
    a = maps['minmax'][0]
    assert torch.allclose(a.amin((2, 3)), torch.zeros(2, 4)) and torch.allclose(a.amax((2, 3)), torch.ones(2, 4))


@pytest.mark.parametrize('attn', ATTN)
def test_batch_of_one_equals_sample_in_batch(attn):
    m = model_built(attn)
    x, a = inputs(b=3)
    with torch.no_grad():
        batch, one = m(x, a), m(x[1:2], a[1:2])
    for k in ('logits', 'z', 'attn'):
        torch.testing.assert_close(one[k][0], batch[k][1], atol=1e-4, rtol=1e-4)


def test_two_audios_one_image_pass_equal_two_forwards():
    m = model_built()
    x, a1 = inputs(seed=1)
    _, a2 = inputs(seed=2)
    calls = []
    hook = m.backbone.layer4.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            feats = m.forward_image(x)
            fused = [m.fuse(feats['u_v'], m.forward_audio(a)) for a in (a1, a2)]
            logits = [m.classify(z, feats['size']) for z, _ in fused]
            assert len(calls) == 1
            full = [m(x, a1), m(x, a2)]
    finally:
        hook.remove()
    for (z, attn), lg, ref in zip(fused, logits, full):
        torch.testing.assert_close(z, ref['z'])
        torch.testing.assert_close(attn, ref['attn'])
        torch.testing.assert_close(lg, ref['logits'])
    assert not torch.allclose(fused[0][0], fused[1][0])  # the audio does change z


def test_gradient_reaches_both_branches():
    m = tiny().train()
    x, a = inputs()
    out = m(x, a)
    loss = F.cross_entropy(out['logits'], torch.randint(0, 22, (2, 32, 32))) + out['z'].square().mean()
    loss.backward()
    for p in (m.backbone.conv1.weight, m.aspp.project[0].weight, m.audio.net.conv1.weight, m.audio_proj.weight,
              m.fusion.q.weight, m.fusion.k.weight, m.fusion.v.weight, m.head[-1].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_bf16_autocast_channels_last_runs():
    m = copy.deepcopy(model_built('softmax')).to(memory_format=torch.channels_last)
    x, a = inputs()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = m(x.to(memory_format=torch.channels_last), a)
    assert out['logits'].shape == (2, 22, 32, 32) and torch.isfinite(out['logits'].float()).all()


def test_loads_local_file_strictly_dropping_fc(tmp_path):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / 'r18.pth')
    # old torchvision files have no num_batches_tracked: still a strict match
    torch.save({k: v for k, v in tv.state_dict().items() if 'num_batches' not in k}, tmp_path / 'old.pth')
    m = tiny(weights=str(tmp_path / 'old.pth'), audio_weights=str(tmp_path / 'r18.pth'))
    torch.testing.assert_close(m.backbone.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    torch.testing.assert_close(m.audio.net.layer2[0].bn1.running_var, tv.layer2[0].bn1.running_var)
    # an RGB conv1 does not fit 2 log-mel planes: it keeps its random init, as the official audio net
    fresh = tiny(audio_weights=None).audio.net.conv1.weight
    m = tiny(audio_weights=str(tmp_path / 'r18.pth'))
    assert m.audio.net.conv1.weight.shape == (64, 2, 7, 7)
    torch.testing.assert_close(m.audio.net.conv1.weight, fresh)
    torch.testing.assert_close(m.audio.net.layer1[0].conv1.weight, tv.layer1[0].conv1.weight)


def test_mismatched_state_dict_names_keys(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state['layer1.0.conv_1.weight'] = state.pop('layer1.0.conv1.weight')
    state['extra.bias'] = torch.zeros(3)
    state['bn1.weight'] = torch.ones(65)
    torch.save(state, tmp_path / 'bad.pth')
    with pytest.raises(RuntimeError) as e:
        tiny(weights=str(tmp_path / 'bad.pth'))
    msg = str(e.value)
    assert 'weights=' in msg and 'bad.pth' in msg
    assert '1 missing keys (layer1.0.conv1.weight)' in msg
    assert '2 unexpected keys (extra.bias, layer1.0.conv_1.weight)' in msg
    assert '1 wrong-shape keys (bn1.weight)' in msg
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / 'r34.pth')
    with pytest.raises(RuntimeError, match=r"audio_weights=.*\d+ unexpected keys \(layer1\.2\.bn1\.bias, .*, \.\.\.\)"):
        tiny(audio_weights=str(tmp_path / 'r34.pth'))


def test_missing_weights_file():
    with pytest.raises(FileNotFoundError, match=r"weights='/no/such/r18\.pth': no such file"):
        tiny(weights='/no/such/r18.pth')
    with pytest.raises(FileNotFoundError, match=r"audio_weights='/no/such/a\.pth'"):
        tiny(audio_weights='/no/such/a.pth')


def _offline(monkeypatch, calls=None):
    """No network: every download fails as urllib fails offline (calls, when given, records the attempts)."""
    import urllib.error

    def fail(url, dst, hash_prefix=None, progress=True):
        if calls is not None:
            calls.append((url, dst, hash_prefix))
        raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', fail)


def test_imagenet_weights_as_torchvision_caches_them(tmp_path, monkeypatch):
    """--weights imagenet reads torchvision's file from the torch hub cache under TORCH_HOME with no network; a file
    not cached is downloaded once (hash prefix from its name) and read from the cache afterwards; offline, one
    error names the file and the folder to copy it into."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    cache = tmp_path / 'hub' / 'checkpoints'
    calls = []
    _offline(monkeypatch, calls)
    with pytest.raises(FileNotFoundError) as e:
        tiny(weights='imagenet')
    assert 'resnet18-f37072fd.pth is not in ' + str(cache) in str(e.value) and 'could not be downloaded' in str(e.value)
    assert calls == [('https://download.pytorch.org/models/resnet18-f37072fd.pth',
                      str(cache / 'resnet18-f37072fd.pth'), 'f37072fd')] and not os.listdir(cache)
    torch.manual_seed(4)
    tv = torchvision.models.resnet18()
    fetched = []

    def download(url, dst, hash_prefix=None, progress=True):   # what torch.hub does online, without the network
        fetched.append(url)
        torch.save(tv.state_dict(), dst)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', download)
    m = tiny(weights='imagenet', audio_weights='imagenet', audio_channels=1)
    assert fetched == ['https://download.pytorch.org/models/resnet18-f37072fd.pth']   # once for both trunks
    torch.testing.assert_close(m.backbone.conv1.weight, tv.conv1.weight)
    assert m.audio.net.conv1.weight.shape == (64, 1, 7, 7)   # re-initialised for the one log-mel plane
    _offline(monkeypatch)
    m = tiny(weights='imagenet')                              # cached: no network needed
    torch.testing.assert_close(m.backbone.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)


def test_vggish_weights_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    _offline(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"audio_weights='vggish': vggish-10086976\.pth is not in .*hub"):
        VGGish(weights='vggish')
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True, exist_ok=True)
    sd = _random_torchvggish(3)
    torch.save(sd, tmp_path / 'hub' / 'checkpoints' / 'vggish-10086976.pth')
    torch.testing.assert_close(VGGish(weights='vggish').embeddings[4].weight, sd['embeddings.4.weight'])


def test_auto_weights_by_source():
    def auto(source, *argv):
        a = train.get_args(['--preset', 'paper', *argv])
        train.resolve_weights(a, source)
        return a.weights, a.audio_weights
    assert auto('builtin') == ('none', 'none')                        # generated shapes: random init
    assert auto('vpo') == auto('official') == ('imagenet', 'imagenet')
    assert auto('vpo', '--backbone', 'resnet10', '--audio-backbone', 'resnet10') == ('none', 'none')
    assert auto('avsbench', '--data', 's4') == ('imagenet', 'vggish')
    assert auto('vpo', '--weights', 'none', '--audio-weights', 'x.pth') == ('none', 'x.pth')   # given: kept


def test_cli_imagenet_weights_offline_is_one_line(tiny_root, tmp_path):
    """Through train.py, with an empty TORCH_HOME and no way out (a proxy that refuses): exit 2, one line."""
    env = {**os.environ, 'TORCH_HOME': str(tmp_path / 'th'), 'https_proxy': 'http://127.0.0.1:9',
           'HTTPS_PROXY': 'http://127.0.0.1:9', 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    r = subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), '--root', tiny_root, '--out', str(tmp_path),
                        *TINY, '--backbone', 'resnet18', '--weights', 'imagenet'], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert r.stderr.count('\n') == 1 and r.stderr.startswith("error: weights='imagenet' (resnet18): resnet18-f37072fd.pth")
    assert 'offline, fetch https://download.pytorch.org/models/resnet18-f37072fd.pth elsewhere' in r.stderr


def test_resnet10_is_resnet18_with_one_block_per_stage(tmp_path):
    r10, r18 = model.resnet_trunk('resnet10'), model.resnet_trunk('resnet18')
    assert [len(getattr(r10, f'layer{i}')) for i in range(1, 5)] == [1, 1, 1, 1]
    # its keys are exactly ResNet-18's first block of each stage (a resnet18 file does not load: extra keys)
    first = {k for k in r18.state_dict() if not any(f'layer{i}.1.' in k for i in range(1, 5))}
    assert set(r10.state_dict()) == first
    m = tiny(backbone='resnet10', audio_backbone='resnet10', output_stride=16, dim=64).eval()
    x, a = inputs()
    with torch.no_grad():
        out = m(x, a)
    assert out['logits'].shape == (2, 22, 32, 32) and out['z'].shape == (2, 64, 8, 8)
    assert len(m.audio.net.layer4) == 1
    with pytest.raises(ValueError, match="weights='imagenet': torchvision has no ImageNet weights for resnet10"):
        tiny(backbone='resnet10', weights='imagenet')
    torch.save(r10.state_dict(), tmp_path / 'r10.pth')   # a local resnet10 file loads strictly
    m = tiny(backbone='resnet10', weights=str(tmp_path / 'r10.pth'))
    torch.testing.assert_close(m.backbone.conv1.weight, r10.conv1.weight)


def test_bad_arguments_name_themselves():
    for kw, name in (({'attn': 'relu'}, 'attn'), ({'output_stride': 32}, 'output_stride'),
                     ({'backbone': 'vgg16'}, 'backbone'), ({'dim': 302}, 'dim'), ({'audio_backbone': 'vggish'},
                                                                                  'audio_backbone')):
        with pytest.raises(ValueError, match=name):
            tiny(**kw)


# ====================================================================================================
# Sec. 4.2, Eqs. 1-5, Table 6, App. B.1: pairing, anchor sets, CAVP loss, sampling, memory bank (loss.py)
# ====================================================================================================

C = 22
CAR, CAT, DOG, HORSE = 5, 6, 9, 12       # indices in vpo.VPO_CLASSES


def hot(*classes, n=1):
    """(n, C) multi-hot rows of the given classes."""
    t = torch.zeros(n, C)
    t[:, list(classes)] = 1
    return t


# ---- brute-force references, loops straight from the definitions (Eqs. 2-4 read per pixel; Khosla et al.) ----

def _similarities(z):
    rows = [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in z.tolist()]
    return [[sum(a * b for a, b in zip(ri, rj)) for rj in rows] for ri in rows]


def ref_cavp(z, role, tau):
    s, role, n = _similarities(z), role.tolist(), len(role)
    losses = []
    for i in range(n):
        c = role[i]
        if c < 0:                                                   # roles -1, -2 are no anchors
            continue
        positives = [j for j in range(n) if j != i and role[j] == c]
        if c >= 1:
            negatives = [j for j in range(n) if role[j] >= 0 and role[j] != c]     # N_fg
        else:
            negatives = [j for j in range(n) if role[j] >= 1]                     # N_bg = E_fg
        if not positives:
            continue
        neg = sum(math.exp(s[i][k] / tau) for k in negatives)
        terms = []
        for p in positives:
            e = math.exp(s[i][p] / tau)
            terms.append(-math.log(e / (e + neg)))
        losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses) if losses else 0.0


def ref_supcon(z, y, tau):
    s, y, n = _similarities(z), y.tolist(), len(y)
    losses = []
    for i in range(n):
        if y[i] == 255:
            continue
        positives = [j for j in range(n) if j != i and y[j] == y[i]]
        others = [j for j in range(n) if j != i and y[j] != 255]
        if not positives:
            continue
        den = sum(math.exp(s[i][a] / tau) for a in others)
        losses.append(sum(-math.log(math.exp(s[i][p] / tau) / den) for p in positives) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


# ---- anchor_sets (Eq. 2) ----

def test_anchor_sets_single_source():
    y = torch.tensor([0, DOG, 255])
    own = hot(DOG, n=3)
    assert loss.anchor_sets(y, own, own).tolist() == [0, DOG, -2]                 # matched pair
    assert loss.anchor_sets(y, own, own).dtype == torch.long
    assert loss.anchor_sets(y, hot(CAR, n=3), own).tolist() == [-1, 0, -2]        # dog silent, bg unknown
    assert loss.anchor_sets(y, hot(DOG, n=3), own).tolist() == [0, DOG, -2]       # another dog clip


def test_anchor_sets_multi_source_partial_overlap():
    y = torch.tensor([0, DOG, CAT, 255])
    own = hot(DOG, CAT, n=4)
    # image {dog, cat} with audio {dog, car}: dog sounds, cat silent, bg might be an unlabelled car
    assert loss.anchor_sets(y, hot(DOG, CAR, n=4), own).tolist() == [-1, DOG, 0, -2]
    # audio {dog} brings no new class: bg is background, cat silent
    assert loss.anchor_sets(y, hot(DOG, n=4), own).tolist() == [0, DOG, 0, -2]
    assert loss.anchor_sets(y, own, own).tolist() == [0, DOG, CAT, -2]


def test_anchor_sets_multi_instance_and_batch_rows():
    # MSMI: two dogs, only one sounds (the silent dog is labelled 0); rows of two different images
    y = torch.tensor([DOG, 0, 0, HORSE, 0])
    own = torch.cat([hot(DOG, n=3), hot(HORSE, n=2)])
    paired = torch.cat([hot(DOG, n=3), hot(DOG, n=2)])      # image 2 hears image 1's dog
    assert loss.anchor_sets(y, own, own).tolist() == [DOG, 0, 0, HORSE, 0]
    assert loss.anchor_sets(y, paired, own).tolist() == [DOG, 0, 0, 0, -1]
    # bool and float inputs agree
    assert torch.equal(loss.anchor_sets(y, paired.bool(), own.bool()), loss.anchor_sets(y, paired, own))


def test_anchor_sets_rejects_bad_labels():
    with pytest.raises(ValueError, match='anchor_sets'):
        loss.anchor_sets(torch.tensor([0, 30]), hot(DOG, n=2), hot(DOG, n=2))


# ---- cavp_loss (Eqs. 3-5) against the brute force ----

@pytest.mark.parametrize('seed', range(6))
def test_cavp_loss_matches_bruteforce(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(30, 61, (1,), generator=g))
    z = torch.randn(n, 8, generator=g, dtype=torch.float64)
    role = torch.tensor([-2, -1, 0, 0, 1, 2, 3])[torch.randint(0, 7, (n,), generator=g)]
    for tau in (0.1, 0.5):
        assert abs(loss.cavp_loss(z, role, tau).item() - ref_cavp(z, role, tau)) < 1e-5
    assert abs(loss.cavp_loss(z.float(), role).item() - ref_cavp(z, role, 0.1)) < 1e-4   # float32 too


EDGE_ROLES = {
    'empty': [],
    'all_unknown': [-1] * 10,
    'unknown_and_ignore': [-1, -2, -1, -2],
    'single_class': [3] * 8,                      # positives, no negatives: -log 1 = 0
    'single_class_and_unknown': [3, 3, 3, -1, -1, -2],
    'only_background': [0] * 6,
    'no_positives': [0, 1, 2, 3, -1],
    'single_anchor': [2],
    'fg_and_bg': [0, 0, 0, 4, 4, -1],
    'singleton_fg': [0, 0, 0, 5, -2],             # the fg pixel has no positive, is still a bg negative
}


@pytest.mark.parametrize('name', EDGE_ROLES)
def test_cavp_loss_edge_cases(name):
    role = torch.tensor(EDGE_ROLES[name], dtype=torch.long)
    z = torch.randn(len(role), 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z.requires_grad_()
    value = loss.cavp_loss(z, role)
    assert torch.isfinite(value)
    assert abs(value.item() - ref_cavp(z.detach(), role, 0.1)) < 1e-5
    value.backward()                               # an empty loss still backpropagates
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_gradients_finite_in_hard_regimes():
    g = torch.Generator().manual_seed(2)
    role = torch.tensor([0, 0, 1, 1, 2, -1, -2, 3])
    for scale, tau, dtype in [(1.0, 0.1, torch.float32), (1e4, 0.01, torch.float32), (1e-3, 0.05, torch.float16)]:
        z = (torch.randn(8, 16, generator=g) * scale).to(dtype).requires_grad_()
        value = loss.cavp_loss(z, role, tau)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(z.grad).all()
    # identical features: every similarity equal
    z = torch.ones(8, 4, requires_grad=True)
    loss.cavp_loss(z, role).backward()
    assert torch.isfinite(z.grad).all()


def test_sgd_on_z_lowers_the_loss():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 8, generator=g).requires_grad_()
    role = torch.randint(-1, 4, (40,), generator=g)
    first = loss.cavp_loss(z, role).item()
    for _ in range(10):                          # plain SGD, lr 2 (torch.optim costs seconds to import)
        z.grad = None
        loss.cavp_loss(z, role).backward()
        with torch.no_grad():
            z -= 2 * z.grad
    assert loss.cavp_loss(z, role).item() < 0.5 * first


# ---- supcon_loss (Table 5) ----

def test_supcon_hand_case():
    # three unit vectors of class 1 (two along x, one along y), one of class 2 along -x, one ignored
    z = torch.tensor([[1., 0.], [1., 0.], [0., 1.], [-1., 0.], [0., -1.]])
    y = torch.tensor([1, 1, 1, 2, 255])
    e = math.e
    # Khosla: anchor 0 -> positives 1 (s=1), 2 (s=0); denominator over 1, 2, 3: e + 1 + 1/e
    a0 = (-(1 - math.log(e + 1 + 1 / e)) - (0 - math.log(e + 1 + 1 / e))) / 2     # same for anchor 1
    a2 = -(0 - math.log(3)) * 1                                                    # s = 0 to 0, 1, 3
    expected = (2 * a0 + a2) / 3                                                   # anchor 3: no positive
    assert abs(loss.supcon_loss(z, y, tau=1.0).item() - expected) < 1e-6
    assert abs(loss.supcon_loss(z, y, tau=1.0).item() - ref_supcon(z, y, 1.0)) < 1e-6
    # the CAVP denominator (positive at hand + negatives) gives a different number on this case...
    assert abs(loss.cavp_loss(z, torch.tensor([1, 1, 1, 2, -2]), 1.0).item() - expected) > 1e-2
    # ...and the same one when every anchor has a single positive
    y2, role2 = torch.tensor([1, 1, 2, 2]), torch.tensor([1, 1, 2, 2])
    assert abs(loss.supcon_loss(z[:4], y2, 1.0).item() - loss.cavp_loss(z[:4], role2, 1.0).item()) < 1e-6


@pytest.mark.parametrize('seed', range(3))
def test_supcon_matches_bruteforce(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 2, 255])[torch.randint(0, 5, (40,), generator=g)]
    value = loss.supcon_loss(z, y)
    assert abs(value.item() - ref_supcon(z.detach(), y, 0.1)) < 1e-5
    value.backward()
    assert torch.isfinite(z.grad).all()


# ---- sampling (Table 6) ----

def _roles():
    counts = {0: 5000, 1: 300, 2: 1000, -1: 400, -2: 100}
    role = torch.cat([torch.full((c,), r) for r, c in counts.items()])
    return role[torch.randperm(len(role), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize('pos_frac,n_fg,n_bg', [(0.1, 28, 252), (0.5, 256, 256), (0.9, 512, 57)])
def test_sample_pixels_caps_and_proportion(pos_frac, n_fg, n_bg):
    role = _roles()
    idx = loss.sample_pixels(role, max_anchors=256, pos_frac=pos_frac, generator=torch.Generator().manual_seed(1))
    picked = role[idx]
    assert len(idx.unique()) == len(idx)
    assert (picked >= 0).all()                                   # never E_unknown nor ignore
    assert all((picked == r).sum() <= 256 for r in range(3))     # at most max_anchors per role
    assert (picked >= 1).sum() == n_fg and (picked == 0).sum() == n_bg
    assert abs(n_fg / (n_fg + n_bg) - pos_frac) < 0.01


def test_sample_pixels_is_random_and_reproducible():
    role = _roles()
    pick = lambda s: loss.sample_pixels(role, max_anchors=64, pos_frac=0.5, generator=torch.Generator().manual_seed(s))
    assert torch.equal(pick(5), pick(5)) and not torch.equal(pick(5), pick(6))
    with pytest.raises(ValueError, match='pos_frac'):
        loss.sample_pixels(role, max_anchors=64, pos_frac=1.0)
    assert len(loss.sample_pixels(torch.full((20,), 3), max_anchors=8, pos_frac=0.5)) == 0   # no E_bg
    assert len(loss.sample_pixels(torch.zeros(0, dtype=torch.long), max_anchors=8, pos_frac=0.5)) == 0


# ---- contrastive_loss: the glue (downsampling, layout, sampling) ----

def _batch():
    small = torch.zeros(2, 4, 4, dtype=torch.long)               # B, h, w
    small[0, :2] = 1                                             # image 0: top half class 1
    small[1, :, :2] = 2                                          # image 1: left half class 2
    small[1, 2:, 2:] = 255                                       # and an ignored corner
    y = small.repeat_interleave(2, 1).repeat_interleave(2, 2)    # B, 8, 8
    y[:, 1::2, :] = 7                                            # nearest must read the top-left pixels only
    y[:, :, 1::2] = 7
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return z, y, small, torch.cat([hot(1), hot(2)])


def test_contrastive_loss_equals_cavp_on_all_pixels():
    z, y, small, t = _batch()
    # 16 E_fg and 12 E_bg pixels: pos_frac 4/7 with a large cap takes every one of them
    value, stats = loss.contrastive_loss(z, y, t, t, max_anchors=100, pos_frac=4 / 7)
    role = small.flatten().masked_fill(small.flatten() == 255, -2)
    expected = loss.cavp_loss(z.permute(0, 2, 3, 1).reshape(-1, 8), role)                 # B*h*w, D
    assert abs(value.item() - expected.item()) < 1e-10
    assert stats == dict(n_anchors=28, n_fg=16, n_bg=12, n_unknown=0)
    value, _ = loss.contrastive_loss(z, y, None, None, mode='supcon', max_anchors=100, pos_frac=4 / 7)
    assert abs(value.item() - loss.supcon_loss(z.permute(0, 2, 3, 1).reshape(-1, 8), small.flatten()).item()) < 1e-10


def test_contrastive_loss_permuted_pairing_stats_and_grad():
    z, y, _, t = _batch()
    z = torch.cat([z, z]).requires_grad_()                      # original pairs, then swapped pairs
    own = torch.cat([t, t])
    a_hot = torch.cat([t, t.flip(0)])
    value, stats = loss.contrastive_loss(z, torch.cat([y, y]), a_hot, own, max_anchors=100, pos_frac=0.5,
                                         generator=torch.Generator().manual_seed(0))
    assert stats['n_unknown'] == 8 + 4                           # background of both swapped rows
    assert all(isinstance(v, int) for v in stats.values())
    value.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ---- memory bank (App. B.1) and pairing (Eq. 1) ----

def test_memory_bank_fifo():
    bank = loss.MemoryBank(num_classes=C, capacity=2)
    waves = torch.arange(4.).repeat_interleave(3).view(4, 3)    # clip k is all k
    bank.push(waves, torch.tensor([DOG, DOG, 0, DOG]))          # class 0 is skipped
    waves[:] = -1                                               # the bank holds copies
    assert [w[0].item() for w in bank.clips[DOG]] == [1.0, 3.0]  # oldest dropped first
    assert bank.sample(CAT) is None
    g = torch.Generator().manual_seed(0)
    assert {bank.sample(DOG, generator=g)[0].item() for _ in range(30)} == {1.0, 3.0}
    assert bank.stored().tolist() == [c == DOG for c in range(C)]
    with pytest.raises(ValueError, match='MemoryBank.push'):
        bank.push(torch.zeros(2, 3), torch.tensor([1]))


def test_bank_swap_only_touches_mismatched_pairs():
    own = torch.cat([hot(DOG), hot(DOG), hot(CAT), hot(CAR), hot(CAT, DOG)])
    bank_cls = torch.tensor([DOG, DOG, CAT, CAR, CAT])
    perm = torch.tensor([1, 0, 3, 2, 4])   # 0<->1 same class, 2<->3 mismatched, 4 fixed point
    g = torch.Generator().manual_seed(0)
    assert loss.bank_swap(perm, own, bank_cls, rate=1.0, generator=g).tolist() == [False, False, True, True, False]
    assert not loss.bank_swap(perm, own, bank_cls, rate=0.0, generator=g).any()
    stored = torch.zeros(C, dtype=torch.bool)
    stored[CAT] = True                                           # no car clip yet
    assert loss.bank_swap(perm, own, bank_cls, rate=1.0, stored=stored).tolist() == [False, False, True, False, False]
    draws = torch.stack([loss.bank_swap(perm, own, bank_cls, rate=0.5, generator=g) for _ in range(400)])
    assert draws[:, [0, 1, 4]].sum() == 0 and 0.4 < draws[:, [2, 3]].float().mean() < 0.6
    # the swapped rows' new audio classes: one-hot of the image's own class
    swap = loss.bank_swap(perm, own, bank_cls, rate=1.0)
    a_hot = torch.where(swap[:, None], F.one_hot(bank_cls, C).bool(), own[perm].bool())
    assert loss.anchor_sets(torch.tensor([CAT]), a_hot[2:3], own[2:3]).tolist() == [CAT]


def test_pair_permutation():
    p = loss.pair_permutation(16, generator=torch.Generator().manual_seed(0))
    assert sorted(p.tolist()) == list(range(16))
    assert torch.equal(p, loss.pair_permutation(16, generator=torch.Generator().manual_seed(0)))


# ====================================================================================================
# Eq. 5, App. B.1: the training step, the loop, checkpoints and resume (train.py)
# ====================================================================================================

TINY = ['--crop', '48', '--batch-size', '4', '--workers', '0', '--max-steps', '2', '--limit', '12',
        '--audio-seconds', '1', '--vis', '0', '--eval-every', '1', '--bank-rate', '1.0']


@pytest.fixture(scope='module')
def tiny_root(builtin):
    return os.path.dirname(builtin)


def run(root, out, *extra):
    return train.main(['--data', 'vpo_ss', '--root', root, '--out', str(out), *TINY, *extra])


def test_e2e_writes_metrics_and_log(tiny_root, tmp_path):
    m = run(tiny_root, tmp_path, '--epochs', '1', '--name', 'e2e', '--vis', '2')
    d = tmp_path / 'e2e'
    saved = json.load(open(d / 'metrics.json'))
    for k in ('miou', 'fbeta', 'fdr', 'cf_miou', 'halluc_silence', 'per_class', 'args'):
        assert k in saved
    assert saved == json.loads(json.dumps(m)) and saved['best_epoch'] == 1 and saved['args']['epochs'] == 1
    kinds = [json.loads(line)['kind'] for line in open(d / 'log.jsonl')]
    assert kinds.count('val') == 1 and kinds[-1] == 'test' and 'step' in kinds
    assert (d / 'best.pt').exists() and (d / 'last.pt').exists() and len(os.listdir(d / 'vis')) == 2
    assert_metrics_are_best_pt(saved, d, tiny_root)


def assert_metrics_are_best_pt(saved, d, root):
    """metrics.json holds the scores of best.pt on the test split: mIoU is the mean IoU over the classes present,
    and evaluating best.pt again gives the same numbers."""
    iou = [v for v in saved['per_class']['iou'] if v is not None]
    assert saved['miou'] == pytest.approx(sum(iou) / len(iou))
    net, a = ev.load_checkpoint(str(d / 'best.pt'), 'cpu')
    test = data.build_dataset('vpo_ss', root, 'test', audio_seconds=a['audio_seconds'], mono=a['mono'],
                              test_scale=a['test_scale'])
    test.rows = test.rows[:a['limit']]
    again = ev.evaluate(net, test, 'cpu', probes=not a['no_probes'], progress=False)
    for k in ('miou', 'fbeta', 'J', 'cf_miou', 'halluc_silence'):
        assert again[k] == pytest.approx(saved[k], abs=1e-9), k


# a partial VGGSound download: Table 7 classes without a single clip (vpo.py: classes_without_audio)
MUTE = ('bird', 'cell phone', 'skateboard', 'tennis racket', 'zebra')


@pytest.fixture(scope='module')
def vpo_mute(builtin, tmp_path_factory):
    """VPO built by vpo.build from the built-in COCO tree and its audio folder without MUTE's label folders: their
    objects never sound and have `clip: null`. Returns (VPO folder, summary)."""
    root, src = tmp_path_factory.mktemp('mute'), os.path.dirname(builtin)
    gone = {vpo.folder_name(label) for c in MUTE for label in vpo.TABLE7[c]}
    (root / 'audio').mkdir()
    for d in sorted(set(os.listdir(os.path.join(src, 'audio'))) - gone):
        os.symlink(os.path.join(src, 'audio', d), root / 'audio' / d)
    summary = vpo.build(os.path.join(src, 'coco'), str(root / 'audio'), str(root / 'vpo'), workers=1, progress=False)
    return str(root / 'vpo'), summary


def _rows(folder, subset, split):
    return [json.loads(line) for line in open(os.path.join(folder, subset, f'{split}.jsonl'))]


def test_manifest_fields_that_may_be_null_are_handled(vpo_mute):
    """clip is null exactly for the objects of a class without audio, which never sound; alpha, area and inst are
    always written by vpo.build (the official release's inst / area None: test_official_release, and the probes
    skip such rows: test_probes_skip_and_count_samples_they_cannot_take)."""
    folder, summary = vpo_mute
    assert set(summary['skipped']['classes_without_audio']) == set(MUTE)
    nulls = 0
    for subset in vpo.SUBSETS:
        for split in vpo.SPLITS:
            for row in _rows(folder, f'vpo_{subset}', split):
                assert isinstance(row['inst'], str) and os.path.isfile(os.path.join(folder, row['inst']))
                for o in row['objects']:
                    assert isinstance(o['alpha'], float) and 0 <= o['alpha'] <= 1 and isinstance(o['area'], int)
                    assert (o['clip'] is None) == (o['cls'] in MUTE) and not (o['sounding'] and o['clip'] is None)
                    nulls += o['clip'] is None
    assert nulls >= 10
    ds = data.VPODataset(folder, 'vpo_ss', 'test', audio_seconds=0.5)
    i, k = next((i, k) for i, r in enumerate(ds.rows) for k, o in enumerate(r['objects']) if o['clip'] is None)
    with pytest.raises(ValueError, match=rf"test.jsonl:{i + 1}: object {k} \({ds.rows[i]['objects'][k]['cls']}\) "
                                         'has no clip'):
        ds.load(i, sounding=[k])
    s = ds.load(i, sounding=[k], audio='silence')           # its mask without its sound: what the stereo probe reads
    assert s['wave'].abs().sum() == 0 and vpo.CLS_INDEX[ds.rows[i]['objects'][k]['cls']] in s['label'].unique()
    rows = [dict(ds.rows[i], objects=[dict(o, sounding=n == k) for n, o in enumerate(ds.rows[i]['objects'])])]
    with pytest.raises(ValueError, match=rf'test.jsonl:1: object {k} \(.*\) sounds but has no clip'):
        data.VPODataset(folder, 'vpo_ss', 'test', rows=rows)   # a hand-edited manifest: refused when read


def test_e2e_probes_on_a_vpo_whose_audio_lacks_some_classes(vpo_mute, tmp_path, capsys):
    """Train with the probes on: the counterfactual plays only classes that have clips, a sample whose other
    classes all lack audio is skipped, and metrics.json counts both (before: a TypeError after training)."""
    folder, _ = vpo_mute
    rows = _rows(folder, 'vpo_ss', 'test')
    first_silent = lambda objs: next((o['cls'] for o in objs if o['cls'] not in {q['cls'] for q in objs
                                                                               if q['sounding']}), None)
    assert any(first_silent(r['objects']) in MUTE for r in rows)   # the class the probe played before: no clip
    for r in rows:   # the class chosen has every clip, so load() can play it
        c = ev.counterfactual_class(r['objects'])
        assert c is None or all(o['clip'] for o in r['objects'] if o['cls'] == c)
    multi = sum(len({o['cls'] for o in r['objects']}) >= 2 for r in rows)
    skip = sum(len({o['cls'] for o in r['objects']}) >= 2 and ev.counterfactual_class(r['objects']) is None
               for r in rows)
    assert skip >= 1
    tiny_run(folder, tmp_path, '--epochs', '1', '--name', 'mute', '--limit', '0', '--vis', '2')
    m = json.load(open(tmp_path / 'mute' / 'metrics.json'))
    assert m['n'] == len(rows) and m['cf_skipped'] == {'no instance map': 0, 'no clip': skip}
    assert m['cf_n'] == multi - skip and m['cf_n'] > 0 and m['cf_miou'] is not None
    assert m['stereo_n'] == 0 and m['stereo_skipped'] == {'no instance map': 0}
    assert len(os.listdir(tmp_path / 'mute' / 'vis')) == 2
    assert f'probes: cf_n {multi - skip}, skipped {skip} (no clip); stereo_n 0, skipped 0' in capsys.readouterr().out


def test_e2e_a_failed_test_keeps_the_run_and_names_the_sample_and_the_redo(vpo_mute, tmp_path, monkeypatch):
    """A clip that cannot be read in the test (after training): one line naming the sample, its manifest line and
    the clip; best.pt / last.pt stay; the printed --test-only command redoes the test."""
    folder, _ = vpo_mute
    rows = _rows(folder, 'vpo_ss', 'test')
    seen = {o['clip'] for split in ('train', 'val') for r in _rows(folder, 'vpo_ss', split) for o in r['objects']}
    i, clip = next((i, o['clip']) for i, r in enumerate(rows) for o in r['objects']
                   if o['sounding'] and o['clip'] not in seen)
    bad = os.path.join(folder, clip)
    read = data.read_clip

    def damaged(path, *a, **kw):
        if os.path.abspath(path) == os.path.abspath(bad):
            raise RuntimeError(f'cannot read audio clip {path}: damaged')
        return read(path, *a, **kw)
    monkeypatch.setattr(data, 'read_clip', damaged)
    with pytest.raises(train.TestFailed) as e:
        tiny_run(folder, tmp_path, '--epochs', '1', '--name', 'broke', '--limit', '0', '--max-steps', '1')
    msg, d = str(e.value), tmp_path / 'broke'
    assert '\n' not in msg and f"sample {i} ({rows[i]['id']}, {folder}/vpo_ss/test.jsonl:{i + 1})" in msg
    assert 'damaged' in msg and os.path.basename(bad) in msg and f'checkpoints kept in {d}' in msg
    assert f'python train.py --resume {d}/best.pt --test-only' in msg and f'evaluate.py --ckpt {d}/best.pt' in msg
    assert (d / 'best.pt').exists() and (d / 'last.pt').exists() and not (d / 'metrics.json').exists()
    assert json.loads(open(d / 'log.jsonl').readlines()[-1])['kind'] == 'test_failed'
    monkeypatch.undo()   # the clip is readable again: the printed command redoes the test
    m = train.main(['--resume', str(d / 'best.pt'), '--test-only'])
    assert m['n'] == len(rows) and m['cf_skipped']['no clip'] >= 1 and (tmp_path / 'broke-2' / 'metrics.json').exists()


@pytest.mark.parametrize('workers', ['0', '1'])
def test_e2e_resume_continues_exactly(tiny_root, tmp_path, monkeypatch, workers):
    """2 epochs straight == 1 epoch, a crash, a bare --resume, 1 more epoch (weights, optimizer, bank, RNG), with
    and without a loader process (whose base seed must not come from the global RNG that dropout draws from)."""
    run(tiny_root, tmp_path, '--epochs', '2', '--name', 'straight', '--no-probes', '--workers', workers)

    class Crash(Exception):
        pass

    save = train.save_atomic

    def save_then_crash(obj, path):
        save(obj, path)
        if path.endswith('last.pt'):
            raise Crash
    monkeypatch.setattr(train, 'save_atomic', save_then_crash)
    with pytest.raises(Crash):
        run(tiny_root, tmp_path, '--epochs', '2', '--name', 'split', '--no-probes', '--workers', workers)
    monkeypatch.setattr(train, 'save_atomic', save)
    a = torch.load(tmp_path / 'split' / 'last.pt', weights_only=True)
    assert a['epoch'] == 1 and a['step'] == 2 and not os.path.exists(tmp_path / 'split' / 'last.pt.tmp')
    train.main(['--resume', str(tmp_path / 'split' / 'last.pt')])   # everything else from the checkpoint
    s = torch.load(tmp_path / 'straight' / 'last.pt', weights_only=True)
    r = torch.load(tmp_path / 'split' / 'last.pt', weights_only=True)
    assert s['model'].keys() == r['model'].keys() and r['epoch'] == 2 and r['step'] == 4
    assert all(torch.equal(s['model'][k], r['model'][k]) for k in s['model']), \
        [k for k in s['model'] if not torch.equal(s['model'][k], r['model'][k])][:5]
    assert s['best'] == r['best']


def test_balanced_sampling_evens_out_sounding_classes():
    """--balance: weight n_c^-power of a sample's rarest sounding class; draws are a function of (seed, epoch),
    dealt out by rank; power 0 and datasets without VPO rows keep the uniform permutation."""
    obj = lambda c, s=True: {'cls': c, 'sounding': s}
    rows = [{'objects': [obj('car'), obj('dog', False)]}] * 8 + [{'objects': [obj('dog'), obj('car', False)]}] * 2
    ds = types.SimpleNamespace(rows=rows)
    w = train.balance_weights(ds, 1.0)
    assert torch.allclose(w, torch.tensor([1 / 8] * 8 + [1 / 2] * 2, dtype=torch.float64))
    w_half = train.balance_weights(ds, 0.5)
    assert torch.allclose(w_half[0] / w_half[-1], torch.tensor(0.5, dtype=torch.float64))
    assert train.balance_weights(ds, 0.0) is None
    assert train.balance_weights(types.SimpleNamespace(rows=[{'frames': 5}]), 1.0) is None   # AVSBench rows
    mixed = rows + [{'objects': [obj('car', False)]}]   # no sounding object: an average draw
    assert train.balance_weights(types.SimpleNamespace(rows=mixed), 1.0)[-1] == pytest.approx((8 / 8 + 2 / 2) / 10)

    class Rows(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)
    big = Rows(rows * 100)   # car sounds in 800 samples, dog in 200
    def draw(rank, world, epoch):
        sampler = train.EpochSampler(big, weights=train.balance_weights(big, 1.0), num_replicas=world, rank=rank,
                                     shuffle=True, seed=3, drop_last=True)
        sampler.set_epoch(epoch)
        return list(sampler)
    one = draw(0, 1, 0)
    assert len(one) == 1000 and all(e == 0 for e, _ in one)
    dog = sum(big.rows[i]['objects'][0]['cls'] == 'dog' for _, i in one) / len(one)
    assert 0.45 < dog < 0.55   # 0.2 without balancing
    assert one == draw(0, 1, 0) and one != draw(0, 1, 1)   # pure function of (seed, epoch)
    r0, r1 = draw(0, 2, 0), draw(1, 2, 0)
    assert len(r0) == len(r1) == 500 and sorted(r0 + r1) == sorted(one)
    plain = train.EpochSampler(big, num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True)
    assert sorted(i for _, i in plain) == list(range(1000))   # no weights: a permutation


def test_e2e_every_contrast_and_attention(tiny_root, tmp_path):
    """Each variant trains and tests, and does what its flag says."""
    for extra in (['--contrast', 'none'], ['--contrast', 'supcon'], ['--attn', 'softmax'], ['--mono'],
                  ['--test-scale', '1']):
        m = run(tiny_root, tmp_path, '--epochs', '1', '--name', 'v', '--no-probes', '--max-steps', '2', *extra)
        d = tmp_path / os.path.basename(os.path.dirname(m['checkpoint']))
        steps = [r for r in map(json.loads, open(d / 'log.jsonl')) if r['kind'] == 'step']
        if extra[0] == '--contrast':   # CE alone has no contrastive term; SupCon has one
            assert all((r['contrast'] == 0) == (extra[1] == 'none') for r in steps), steps
        net, a = ev.load_checkpoint(str(d / 'best.pt'), 'cpu')
        out = net(torch.randn(1, 3, 48, 48), torch.randn(1, 1 if a['mono'] else 2, 100, 64))
        if extra == ['--attn', 'softmax']:   # normalised over the pixels, per head
            torch.testing.assert_close(out['attn'].sum((2, 3)), torch.ones(1, a['heads']))
        assert net.audio.net.conv1.in_channels == (1 if extra == ['--mono'] else 2)
        assert m['args']['test_scale'] == (1.0 if extra[0] == '--test-scale' else 0.5)   # the CPU preset's 0.5
        assert_metrics_are_best_pt(m, d, tiny_root)


def test_poly_lr_with_and_without_warmup():
    a = types.SimpleNamespace(lr=1.0, poly_power=0.9, warmup_steps=0)
    lrs = [train.poly_lr(a, s, 100) for s in range(100)]
    assert lrs[0] == 1.0 and all(x > y > 0 for x, y in zip(lrs, lrs[1:]))          # App. B.1: poly decay only
    a.warmup_steps = 10
    warm = [train.poly_lr(a, s, 100) for s in range(100)]
    assert warm[0] == pytest.approx(0.1) and all(x < y for x, y in zip(warm[:10], warm[1:10]))
    assert warm[9] == pytest.approx(lrs[9]) and warm[10:] == lrs[10:]               # then the same schedule


def test_forward_bank_clips_cycled_to_a_fixed_shape_give_the_same_pairing():
    """train.py cycles the memory-bank clips up to a power of two on CUDA (cudnn.benchmark); Forward runs them in
    one audio pass after the batch's own clips and fuses image i with audio token src[i], so in eval mode the
    permuted fusion is unchanged by the padding and the original one by the bank."""
    torch.manual_seed(0)
    m = model.CAVP(backbone='resnet18', output_stride=16, dim=64, heads=4).eval()
    net = train.Forward(m)
    x, a, a_bank = torch.randn(5, 3, 64, 64), torch.randn(5, 2, 50, 64), torch.randn(3, 2, 50, 64)
    perm = torch.tensor([1, 2, 3, 4, 0])
    src = torch.tensor([5, 2, 6, 4, 7])   # rows 0, 2, 4 hear bank clips 0, 1, 2; rows 1, 3 the audio perm[i]
    with torch.no_grad():
        _, z, z_perm = net(x, torch.cat([a, a_bank]), src)
        _, _, z_cyc = net(x, torch.cat([a, a_bank[torch.arange(4) % 3]]), src)
        _, _, z_no_bank = net(x, a, perm)
        z_ref, _ = m.fuse(m.forward_image(x)['u_v'], torch.cat([m.forward_audio(a_bank[:1]), m.forward_audio(a[2:3]),
                                                              m.forward_audio(a_bank[1:2]), m.forward_audio(a[4:5]),
                                                              m.forward_audio(a_bank[2:3])]))
    torch.testing.assert_close(z_cyc, z_perm)
    torch.testing.assert_close(z_perm, z_ref, atol=1e-5, rtol=1e-4)
    # the bank clips share the audio pass with the batch's own clips but not the tokens: z is the plain pairing
    z_own, _ = m.fuse(m.forward_image(x)['u_v'], m.forward_audio(a))
    torch.testing.assert_close(z, z_own.detach(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(z_perm, z_no_bank)


def test_e2e_benchmark_prints_speed_and_ratio(tiny_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, 'BENCH_WARMUP', 3)
    # 3 warm-up + 2 x 2 timed steps, across epochs of 3 batches
    assert run(tiny_root, tmp_path, '--epochs', '1', '--benchmark', '2') is None
    out = capsys.readouterr().out
    assert 'benchmark --contrast cavp: 2 steps' in out and 'benchmark --contrast none: 2 steps' in out
    assert 'images/s' in out and 'ratio --contrast cavp / none' in out
    assert not os.path.exists(tmp_path / 'vpo_ss')   # a benchmark writes no run folder


def test_bad_arguments_are_named(tiny_root, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match='nowhere.pt'):
        run(tiny_root, tmp_path, '--resume', str(tmp_path / 'nowhere.pt'))
    with pytest.raises(SystemExit):
        train.main(['--data', 'vpo_ss', '--root', tiny_root, '--out', str(tmp_path), '--batch-size', '1'])
    assert '--batch-size 1: expected >= 2' in capsys.readouterr().err


HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_cavp(mono=False, classes=22):
    torch.manual_seed(0)
    return model.CAVP(num_classes=classes, backbone='resnet10', audio_backbone='resnet10', output_stride=16, dim=16,
                      heads=2, audio_channels=1 if mono else 2)


def fake_batch(B=4, C=22, L_=4000, seed=0):
    """A batch as VPODataset collates it: each image has one sounding class (1, 2, 3, 4) and a bank clip of it."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.arange(1, B + 1)
    t = torch.nn.functional.one_hot(cls, C).float()
    waves = torch.randn(B, L_, generator=g)
    label = torch.zeros(B, 32, 32, dtype=torch.long)
    for i, c in enumerate(cls.tolist()):
        label[i, 4:20, 4 + 2 * i:20 + 2 * i] = c
    audio = data.logmel(torch.stack([torch.from_numpy(vpo.pan(w.numpy(), 0.5)) for w in waves]))
    return {'image': torch.randn(B, 3, 32, 32, generator=g), 'audio': audio, 'label': label, 't': t,
            'index': torch.arange(B), 'bank_wave': waves, 'bank_cls': cls,
            'bank_alpha': torch.tensor([0.0, 0.25, 0.75, 1.0][:B])}


def step_args(**kw):
    a = dict(seed=0, bank_rate=1.0, mono=False, max_anchors=64, pos_frac=0.5, tau=0.1, cavp_weight=1.0)
    a.update(kw)
    return types.SimpleNamespace(**a)


ENV = types.SimpleNamespace(device=torch.device('cpu'), amp_dtype=None, channels_last=False, rank=0, world=1)


class Recorder(torch.nn.Module):
    """Forward, recording the audio stack and the index of the audio each image is fused with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, a, src=None):
        self.calls.append((a.detach().clone(), None if src is None else src.clone()))
        return self.net(x, a, src)


def test_train_step_wiring_pairing_bank_swap_and_push(monkeypatch):
    """Through train.train_step itself: the permuted pairing's a_hot lines up with the audio actually fused; a
    swapped row hears a bank clip of its image's class, panned at its object; the batch's clips enter the bank only
    after the swap (no image gets back its own clip)."""
    m = tiny_cavp().train()
    batch = fake_batch()
    B, C = batch['t'].shape
    bank = loss.MemoryBank(num_classes=C, capacity=4)
    stored = {c: torch.full((4000,), 0.1 * c) for c in range(1, B + 1)}   # one known clip per class
    for c, w in stored.items():
        bank.push(w[None], torch.tensor([c]))
    seen = {}
    roles = loss.pixel_roles

    def spy(y, a_hot, own_hot, *, size):
        seen['a_hot'], seen['own'] = a_hot.clone(), own_hot.clone()
        return roles(y, a_hot, own_hot, size=size)
    monkeypatch.setattr(loss, 'pixel_roles', spy)
    net = Recorder(train.Forward(m))
    ds = types.SimpleNamespace(audio_transform=data.logmel, itd=False)
    total, ce, l_cp = train.train_step(net, batch, step_args(), ENV, contrast='cavp', bank=bank, dataset=ds, step=3)
    assert torch.isfinite(total) and l_cp > 0
    a_all, src = net.calls[0]
    a_hot = seen['a_hot'][B:]                      # the permuted pairing's rows of the stacked Z
    assert torch.equal(seen['a_hot'][:B], batch['t']) and torch.equal(seen['own'][:B], batch['t'])
    swapped = [i for i in range(B) if src[i] >= B]
    assert swapped, 'bank_rate 1 with every class stored must swap the mismatched pairs'
    for i in range(B):
        if src[i] < B:   # an original clip: a_hot is that sample's classes
            assert torch.equal(a_hot[i], batch['t'][src[i]])
            assert torch.equal(a_all[src[i]], batch['audio'][src[i]])
        else:            # a bank clip of the image's own class, panned at its object
            c = int(batch['bank_cls'][i])
            assert a_hot[i].argmax() == c and a_hot[i].sum() == 1
            want = data.logmel(torch.from_numpy(vpo.pan(stored[c].numpy(), float(batch['bank_alpha'][i]))))
            torch.testing.assert_close(a_all[src[i]], want)
    # pushed after the swap: the bank now ends with the batch's own clips, none of which was fused
    for c in range(1, B + 1):
        assert torch.equal(bank.clips[c][-1], batch['bank_wave'][c - 1])
    for i in swapped:
        assert not torch.allclose(a_all[src[i]], batch['audio'][i])


def test_train_step_is_a_function_of_the_step():
    m = tiny_cavp().eval()   # eval: no dropout, BatchNorm fixed
    ds = types.SimpleNamespace(audio_transform=data.logmel, itd=False)
    out = []
    for _ in range(2):
        bank = loss.MemoryBank(num_classes=22, capacity=4)
        bank.push(torch.randn(2, 4000, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2]))
        out.append(train.train_step(train.Forward(m), fake_batch(), step_args(), ENV, contrast='cavp', bank=bank,
                                    dataset=ds, step=5)[0].item())
    assert out[0] == out[1]


def test_losses_run_in_fp32_outside_autocast(monkeypatch):
    """--amp bf16: the network runs under autocast, the losses do not (a bf16 N x N similarity matrix has spacing
    0.0625 near 1 / tau = 10)."""
    seen, info_nce = [], loss._info_nce

    def spy(z, role, tau, *, denominator):
        seen.append((torch.is_autocast_enabled('cpu'), z.dtype))
        return info_nce(z, role, tau, denominator=denominator)
    monkeypatch.setattr(loss, '_info_nce', spy)
    env = types.SimpleNamespace(**{**vars(ENV), 'amp_dtype': torch.bfloat16})
    bank = loss.MemoryBank(num_classes=22, capacity=4)
    ds = types.SimpleNamespace(audio_transform=data.logmel, itd=False)
    total, ce, l_cp = train.train_step(train.Forward(tiny_cavp().eval()), fake_batch(), step_args(), env,
                                       contrast='cavp', bank=bank, dataset=ds, step=5)
    assert seen == [(False, torch.float32)] and l_cp.dtype == ce.dtype == torch.float32 and l_cp > 0


def test_param_groups_follow_the_official_trainer():
    """The segmentation head (ASPP, reduce, head) at lr x head_lr_mult, backbone, audio branch and f_CA at lr; no
    weight decay on norm weights and biases; every trainable parameter in exactly one group."""
    m = tiny_cavp()
    groups = train.param_groups(m, head_lr_mult=10.0, weight_decay=5e-4)
    where = {id(q): (g['mult'], g['weight_decay']) for g in groups for q in g['params']}
    assert len(where) == sum(len(g['params']) for g in groups) == len(list(m.parameters()))
    for q, want in ((m.backbone.conv1.weight, (1.0, 5e-4)), (m.backbone.bn1.weight, (1.0, 0.0)),
                    (m.audio.net.layer1[0].conv1.weight, (1.0, 5e-4)), (m.audio_proj.bias, (1.0, 0.0)),
                    (m.fusion.q.weight, (1.0, 5e-4)), (m.fusion.norm.weight, (1.0, 0.0)),
                    (m.aspp.project[0].weight, (10.0, 5e-4)), (m.aspp.project[1].bias, (10.0, 0.0)),
                    (m.reduce[0].weight, (10.0, 5e-4)), (m.head[-1].weight, (10.0, 5e-4)),
                    (m.head[-1].bias, (10.0, 0.0))):
        assert where[id(q)] == want
    a = train.get_args(['--preset', 'paper', '--optimizer', 'sgd'])
    opt = torch.optim.SGD(groups, lr=a.lr, momentum=0.9)
    assert all(g['weight_decay'] in (0.0, 5e-4) for g in opt.param_groups)   # the group's own, not the default


def test_no_dropout_before_the_fusion():
    """The official ASPP has no Dropout: z (and so f_CA's input and the contrastive features) is a deterministic
    function of the batch in train mode."""
    m = tiny_cavp().train()
    assert not any(isinstance(x, nn.Dropout) for x in m.modules())
    x, a = inputs(b=2, size=32, frames=32)
    assert torch.equal(m(x, a)['z'], m(x, a)['z'])


def test_pairing_needs_a_few_samples_per_process():
    assert train.per_process_batch(16, 2, 'cavp') == 8 and train.per_process_batch(4, 1, 'cavp') == 4
    with pytest.raises(ValueError, match=r'--batch-size 16 over 8 processes leaves 2 per process; --contrast cavp'):
        train.per_process_batch(16, 8, 'cavp')
    assert train.per_process_batch(16, 8, 'none') == 2   # no pairing: BatchNorm's 2 suffice
    with pytest.raises(ValueError, match='evenly'):
        train.per_process_batch(16, 3, 'none')
    # refused before any work: the --root typo below is never looked at
    r = subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), '--batch-size', '2', '--root', 'typo'],
                       capture_output=True, text=True, timeout=120, cwd=HERE,
                       env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert r.returncode == 2 and r.stderr.startswith('error: --batch-size 2 over 1 processes leaves 2')


def test_bank_candidates_are_single_source_samples(builtin):
    """App. B.1 as official (source_count == 1): a sample with one sounding object offers its clip to the memory
    bank (and may have its audio swapped); a mixture offers none (bank_cls 0, which push and bank_swap skip)."""
    ds = data.build_dataset('vpo_ms', os.path.dirname(builtin), 'train', train=True, crop=48, audio_seconds=0.5,
                            progress=False)
    for i in range(min(len(ds), 6)):
        n = sum(o['sounding'] for o in ds.rows[i]['objects'])
        mixture, single = ds.load(i), ds.load(i, sounding=[0])   # as stored (n >= 2 here), one object re-chosen
        assert n >= 2 and mixture['bank_cls'] == 0 and not mixture['bank_wave'].any()
        assert single['bank_cls'] == ds.index[ds.rows[i]['objects'][0]['cls']] and single['bank_wave'].any()


def test_compiled_forward_recompiles_at_most_twice():
    """The compiled part sees only tensors whose shapes are fixed by the batch size, but for the number of bank clips
    in the audio stack: dynamo compiles once, once more with that dim dynamic, and never again."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    m = tiny_cavp().train()
    net = torch.compile(train.Forward(m), backend='eager')
    batch = fake_batch()
    ds = types.SimpleNamespace(audio_transform=data.logmel, itd=False)
    bank = loss.MemoryBank(num_classes=22, capacity=4)
    for step in range(20):
        # rates cycling from none to every mismatched pair swapped: 0..4 bank clips in the audio pass
        total, _, _ = train.train_step(net, batch, step_args(bank_rate=(step % 5) / 4), ENV, contrast='cavp',
                                       bank=bank, dataset=ds, step=step)
        total.backward()
    assert counters['frames']['total'] <= 3, dict(counters['frames'])
    torch._dynamo.reset()


def test_paper_preset_is_app_b1():
    p = train.PRESETS['paper']
    assert (p['backbone'], p['output_stride'], p['crop'], p['scale'], p['batch_size'], p['epochs']) == \
        ('resnet50', 8, 512, (0.5, 2.0), 16, 80)
    assert (p['optimizer'], p['lr'], p['weight_decay'], p['head_lr_mult'], p['audio_seconds']) == \
        ('sgd', 1e-3, 5e-4, 10.0, 3.0)
    assert (p['max_anchors'], p['dim'], p['warmup_steps'], p['audio_backbone'], p['test_scale']) == \
        (512, 304, 0, 'resnet18', 1.0)
    a = train.get_args(['--preset', 'paper'])
    assert (a.tau, a.momentum, a.poly_power, a.cavp_weight, a.heads, a.attn, a.contrast) == \
        (0.1, 0.9, 0.9, 1.0, 4, 'sigmoid', 'cavp')


def test_cpu_preset_per_subset():
    """VPO-MS on the CPU trains in batches of 32 at lr 4e-3, VPO-MSMI sees the width of most images (crop 80 at
    scale 0.45); a typed flag still wins; the paper preset and VPO-SS are untouched."""
    ss, ms, msmi = (train.get_args(['--preset', 'cpu', '--data', d]) for d in data.VPO_SUBSETS)
    assert all(getattr(ss, k) == v for k, v in train.PRESETS['cpu'].items())
    assert (ms.epochs, ms.crop, ms.batch_size, ms.lr) == (8, 64, 32, 4e-3)
    assert (msmi.crop, msmi.scale, msmi.test_scale, msmi.epochs, msmi.batch_size) == (80, (0.45, 0.45), 0.45, 7, 16)
    assert round(178 * msmi.scale[1]) <= msmi.crop < 224 * msmi.scale[0]   # 178 px wide fit whole, 224 px do not
    assert train.get_args(['--preset', 'cpu', '--data', 'vpo_msmi', '--crop', '64']).crop == 64
    assert train.get_args(['--preset', 'paper', '--data', 'vpo_msmi']).crop == 512


@pytest.mark.parametrize('flags,name', [(['--audio-seconds', '0'], '--audio-seconds'),
                                        (['--audio-seconds', '-1'], '--audio-seconds'),
                                        (['--scale', '0', '0'], '--scale'), (['--tau', '0'], '--tau'),
                                        (['--pos-frac', '1'], '--pos-frac'), (['--epochs', '0'], '--epochs'),
                                        (['--lr', '-1'], '--lr'), (['--bank-rate', '2'], '--bank-rate'),
                                        (['--protocol', 'avsbench'], '--protocol avsbench'),
                                        (['--data', 'ms3', '--protocol', 'avsbench', '--test-batch', '0'],
                                         '--test-batch 0: expected >= 1'),
                                        (['--test-batch', '4'], '--test-batch 4: only with --protocol avsbench')])
def test_numeric_flags_checked_at_parse_time(flags, name, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args(flags)
    assert e.value.code == 2 and name in capsys.readouterr().err


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    import argparse
    path = tmp_path / 'evil.pt'   # an argparse.Namespace is enough: weights_only refuses any pickled class
    torch.save({'model': {}, 'args': argparse.Namespace(data='vpo_ss')}, path)
    with pytest.raises(ValueError, match='evil.pt'):
        train.get_args(['--resume', str(path)])


def test_rng_state_round_trip_is_plain():
    import random
    train.set_rng_state(train.rng_state())
    s = train.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    train.set_rng_state(s)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a




def test_e2e_torchrun_two_processes_on_cpu_and_resume(tiny_root, tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): one epoch, then a bare --resume for a second."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    base = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
            os.path.join(HERE, 'train.py')]
    first = subprocess.run(base + ['--data', 'vpo_ss', '--root', tiny_root, '--out', str(tmp_path), *TINY,
                                   '--epochs', '1', '--name', 'ddp', '--no-probes', '--batch-size', '8',
                                   '--limit', '16'],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert 'cpu x2' in first.stdout and first.stdout.count('run folder: ') == 1
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith('ddp')) == ['ddp']   # rank 1 took rank 0's folder
    ckpt = torch.load(tmp_path / 'ddp' / 'last.pt', weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt['step'] == 2   # --max-steps 2 of 4 images per process
    held = ev.hold_folder(str(tmp_path / 'ddp'), 'test')   # a live writer: rank 0 refuses and every rank stops
    try:
        refused = subprocess.run(base + ['--resume', str(tmp_path / 'ddp' / 'last.pt'), '--epochs', '2'],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.close(held)
    assert refused.returncode != 0 and f'is in use by the live process {os.getpid()}' in refused.stderr
    assert 'cavp |' not in refused.stdout
    second = subprocess.run(base + ['--resume', str(tmp_path / 'ddp' / 'last.pt'), '--epochs', '2'],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    ckpt = torch.load(tmp_path / 'ddp' / 'last.pt', weights_only=True)
    assert ckpt['epoch'] == 2 and ckpt['args']['epochs'] == 2
    assert json.load(open(tmp_path / 'ddp' / 'metrics.json'))['best_epoch'] in (1, 2)


def _official_fixture(root, n_train=28, n_test=6):
    """A released VPO-SS (csv, JPEG images, COCO-id masks, mono wavs in VGGSound/audios/), one object per image."""
    classes = [('dog', 18, 300.0), ('car', 3, 700.0), ('cat', 17, 1500.0)]
    lines, rng = [], np.random.default_rng(0)
    for d in ('VGGSound/audios', 'VPO-SS/data'):
        os.makedirs(os.path.join(root, d))
    for img in range(1, n_train + n_test + 1):
        name, cid, hz = classes[img % 3]
        h, w = 48 + 8 * (img % 3), 64
        x0 = int(rng.integers(0, w - 24))
        mask = np.zeros((h, w), np.uint8)
        mask[10:34, x0:x0 + 24] = cid
        pixels = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
        pixels[mask > 0] = [(60 * cid) % 256, 200, 90]
        _png(os.path.join(root, 'VPO-SS', 'mask', f'{img:012d}_{10 * img:012d}.png'), mask)
        Image.fromarray(pixels).save(os.path.join(root, 'VPO-SS', 'data', f'{img:012d}.jpg'))
        clip = f'clip{img}_000000'
        sf.write(os.path.join(root, 'VGGSound', 'audios', clip + '.wav'),
                 0.3 * np.sin(2 * np.pi * hz * np.arange(16000) / 16000).astype(np.float32), 16000)
        split = 'train' if img <= n_train else 'val'
        lines.append(f'{split},{name},{cid},{img},{10 * img},{clip},{(x0 + 12) / w:.3f},0')
    (Path(root) / 'VPO-SS' / 'vpo_ss_data_stereo.csv').write_text(HEADER + '\n'.join(lines) + '\n')
    return root


def test_read_official_writes_through_a_per_process_temporary(tmp_path, monkeypatch):
    """Several processes may remap the same released mask at once (torchrun): each writes its own temporary."""
    root = _release(tmp_path / 'VPO', ['train,car,3,7,70,abc_000010,0.2,0'])
    written, remap = [], vpo._remap_official
    monkeypatch.setattr(vpo, '_remap_official', lambda src, dst: (written.append(dst), remap(src, dst)))
    rows = vpo.read_official(root, 'ss', 'train', val_frac=0.0, cache=str(tmp_path / 'c'), progress=False)
    assert len(written) == 1 and f'.{os.getpid()}.' in os.path.basename(written[0])
    assert os.path.isfile(rows[0]['mask']) and not os.path.exists(written[0])


def test_e2e_torchrun_official_release_from_a_cold_cache(tmp_path):
    """torchrun with 2 CPU processes (gloo) on the official release, its remapped-mask cache not yet made: train,
    validate, test (shared out over the ranks); the test metrics are those of one process's evaluate.py --ckpt."""
    root = _official_fixture(str(tmp_path / 'VPO'))
    cache = vpo.official_cache(root)
    assert not os.path.exists(cache)
    try:
        env = {**os.environ, 'OMP_NUM_THREADS': '1'}
        r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                            os.path.join(HERE, 'train.py'), '--data', 'vpo_ss', '--root', root, '--out', str(tmp_path),
                            '--name', 'off', *TINY, '--batch-size', '8', '--limit', '0', '--epochs', '1', '--vis', '2',
                            '--test-scale', '1'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert 'cpu x2' in r.stdout and r.stdout.count('remapped masks are kept in') == 1   # rank 0 alone derives
        saved = json.load(open(tmp_path / 'off' / 'metrics.json'))
        assert sorted(os.listdir(tmp_path / 'off' / 'vis')) == ['00000.png', '00001.png']   # one from each rank
        ev.main(['--ckpt', str(tmp_path / 'off' / 'best.pt'), '--out', str(tmp_path / 'one')])
        one = json.load(open(tmp_path / 'one' / 'metrics.json'))
        assert saved['n'] == one['n'] == 6 and saved['per_class'] == one['per_class']
        for k in ('miou', 'fbeta', 'fdr', 'J', 'F', 'halluc_silence', 'halluc_noise'):
            assert saved[k] == pytest.approx(one[k], abs=1e-12), k
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_e2e_paper_architecture_with_bf16_autocast_on_cpu(tiny_root, tmp_path, capsys):
    """The paper preset's network and optimizer (ResNet-50 OS 8, ResNet-18 audio, D 304, SGD with the official
    groups) for a few steps at a small crop, with --amp bf16 (CPU autocast: the path a GPU run takes)."""
    m = train.main(['--data', 'vpo_ss', '--root', tiny_root, '--out', str(tmp_path), '--name', 'bf16', *TINY,
                    '--preset', 'paper', '--limit', '4', '--max-steps', '1', '--epochs', '1', '--amp', 'bf16',
                    '--weights', 'none', '--audio-weights', 'none', '--test-scale', '0.25', '--no-probes'])
    out = capsys.readouterr().out
    assert '| preset paper |' in out and '| amp torch.bfloat16 |' in out
    a = m['args']
    assert (a['backbone'], a['output_stride'], a['audio_backbone'], a['dim'], a['optimizer']) == \
        ('resnet50', 8, 'resnet18', 304, 'sgd')
    groups = torch.load(tmp_path / 'bf16' / 'last.pt', weights_only=True)['optimizer']['param_groups']
    assert sorted((g['mult'], g['weight_decay']) for g in groups) == [(1.0, 0.0), (1.0, 5e-4), (10.0, 0.0),
                                                                       (10.0, 5e-4)]
    assert all(math.isfinite(m[k]) for k in ('miou', 'fbeta', 'fdr', 'J'))
    with pytest.raises(ValueError, match='--amp fp16 needs CUDA'):
        train.main(['--data', 'vpo_ss', '--root', tiny_root, '--out', str(tmp_path), *TINY, '--amp', 'fp16'])


def tiny_run(root, out, *extra):
    return train.main(['--data', 'vpo_ss', '--root', root, '--out', str(out), *TINY, *extra])


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), '--root', str(tmp_path / 'typo')],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith('error: --root') and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_mistyped_root_is_an_error_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match='--root'):
        tiny_run(str(tmp_path / 'typo'), tmp_path, '--epochs', '1')
    assert not os.path.exists(tmp_path / 'typo') and not os.path.exists(tmp_path / 'vpo_ss')


def test_e2e_a_second_run_never_overwrites_the_first(tiny_root, tmp_path):
    tiny_run(tiny_root, tmp_path, '--epochs', '1', '--name', 'same', '--no-probes', '--max-steps', '1')
    first = {f: os.path.getmtime(tmp_path / 'same' / f) for f in os.listdir(tmp_path / 'same')}
    tiny_run(tiny_root, tmp_path, '--epochs', '1', '--name', 'same', '--no-probes', '--max-steps', '1')
    assert {f: os.path.getmtime(tmp_path / 'same' / f) for f in first} == first
    assert sorted(os.listdir(tmp_path / 'same-2')) == sorted(first)
    logs = [json.loads(line) for line in open(tmp_path / 'same' / 'log.jsonl')]
    assert [r['kind'] for r in logs].count('test') == 1


def test_e2e_two_runs_started_together_with_one_name_get_two_folders(tiny_root, tmp_path):
    """Two train.py processes started at the same moment with one --name (a script, a job array): each claims a
    folder of its own and writes there only its own seed's checkpoints, log and metrics."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, 'train.py'), '--data', 'vpo_ss', '--root',
                               tiny_root, '--out', str(tmp_path), *TINY, '--epochs', '1', '--max-steps', '1',
                               '--name', 'same', '--no-probes', '--seed', str(seed)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    folders = sorted(d for d in os.listdir(tmp_path) if d.startswith('same'))
    assert folders == ['same', 'same-2']
    printed = [line.split(': ', 1)[1] for out, _ in outs for line in out.splitlines() if line.startswith('run folder')]
    assert sorted(printed) == [str(tmp_path / f) for f in folders]
    seeds = []
    for f in folders:
        m = json.load(open(tmp_path / f / 'metrics.json'))
        seeds.append(m['args']['seed'])
        assert torch.load(tmp_path / f / 'last.pt', weights_only=True)['args']['seed'] == seeds[-1]
        assert torch.load(tmp_path / f / 'best.pt', weights_only=True)['args']['seed'] == seeds[-1]
        kinds = [json.loads(line)['kind'] for line in open(tmp_path / f / 'log.jsonl')]
        assert kinds.count('val') == 1 and kinds.count('test') == 1   # one run's log, not two interleaved
    assert sorted(seeds) == [0, 1]


def test_e2e_resume_of_a_live_run_is_refused_until_its_trainer_is_killed(tiny_root, tmp_path):
    """A run folder has one writer: --resume of a run whose trainer is alive (here paused) exits 2 with one line
    naming the folder and the process, before any work, and --test-only writes a new folder; once that trainer is
    killed with SIGKILL (nothing cleans up), the same --resume continues at once in the same folder."""
    env, script = {**os.environ, 'OMP_NUM_THREADS': '1'}, [sys.executable, os.path.join(HERE, 'train.py')]
    live = subprocess.Popen(script + ['--data', 'vpo_ss', '--root', tiny_root, '--out', str(tmp_path), *TINY,
                                      '--name', 'live', '--epochs', '1000', '--max-steps', '1', '--eval-every', '1000',
                                      '--no-probes'], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = tmp_path / 'live' / 'last.pt'
    try:
        deadline = time.time() + 180
        while not last.exists():
            assert live.poll() is None and time.time() < deadline
            time.sleep(0.2)
        os.kill(live.pid, signal.SIGSTOP)   # alive and holding its folder, without using the CPU
        refused = subprocess.run(script + ['--resume', str(last)], cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=120)
        tested = subprocess.run(script + ['--resume', str(last), '--test-only'], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)   # writes a folder of its own
        os.kill(live.pid, signal.SIGKILL)
        assert live.wait(60) == -signal.SIGKILL
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-2000:]
    assert refused.stderr.startswith(f'error: --resume {last}: {tmp_path / "live"} is in use by the live process '
                                     f'{live.pid}')
    assert 'cavp |' not in refused.stdout   # stopped before building data or model
    assert tested.returncode == 0 and f'run folder: {tmp_path / "live-2"}' in tested.stdout, tested.stderr[-2000:]
    assert not (tmp_path / 'live' / 'metrics.json').exists()
    epoch = torch.load(last, weights_only=True)['epoch']
    resumed = subprocess.run(script + ['--resume', str(last), '--epochs', str(epoch + 1)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f'run folder: {tmp_path / "live"}' in resumed.stdout
    assert torch.load(last, weights_only=True)['epoch'] == epoch + 1
    assert json.load(open(tmp_path / 'live' / 'metrics.json'))['args']['epochs'] == epoch + 1
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith('live')) == ['live', 'live-2']


def test_an_empty_val_split_fails_before_training(tiny_root, tmp_path):
    import shutil
    vpo_dir = tmp_path / 'copy'
    shutil.copytree(os.path.join(tiny_root, 'vpo'), vpo_dir)
    open(vpo_dir / 'vpo_ss' / 'val.jsonl', 'w').close()
    with pytest.raises(ValueError, match='val split is empty'):
        tiny_run(str(vpo_dir), tmp_path, '--epochs', '1', '--name', 'noval')
    assert not os.path.exists(tmp_path / 'noval')


def test_e2e_resume_with_an_explicit_flag_says_so(tiny_root, tmp_path, capsys):
    tiny_run(tiny_root, tmp_path, '--epochs', '1', '--name', 'r', '--no-probes', '--max-steps', '1')
    args = train.get_args(['--resume', str(tmp_path / 'r' / 'last.pt'), '--epochs', '3', '--crop', '32'])
    out = capsys.readouterr().out
    assert args.epochs == 3 and "--epochs 3 overrides the checkpoint's 1" in out
    assert args.crop == 32 and args.limit == 12 and args.max_steps == 1 and args.root == tiny_root
    args = train.get_args(['--resume', str(tmp_path / 'r' / 'last.pt'), '--dim', '64'])
    assert args.dim == 76 and "keeps the checkpoint's dim=76" in capsys.readouterr().out


# ====================================================================================================
# Sec. 5.1, App. C: metrics, probes, pictures, checkpoints, predictions, summaries (evaluate.py)
# ====================================================================================================

# -----------------------------------------------------------------------------------------------
# metrics on hand-made masks


def test_confusion_matrix_hand_made():
    pred = torch.tensor([[0, 1, 2], [1, 1, 0]])
    target = torch.tensor([[0, 1, 1], [255, 1, 2]])
    conf = ev.confusion_matrix(pred, target, 3)
    want = torch.tensor([[1, 0, 0],      # target 0: predicted 0
                         [0, 2, 1],      # target 1: predicted 1, 1, 2
                         [1, 0, 0]])     # target 2: predicted 0; the 255 pixel is skipped
    assert conf.dtype == torch.int64 and torch.equal(conf, want)
    assert ev.confusion_matrix(pred, torch.full_like(target, 255), 3).sum() == 0  # all-ignore image
    with pytest.raises(ValueError):
        ev.confusion_matrix(pred, torch.full_like(target, 7), 3)


def test_semantic_scores_hand_made():
    # class 0: TP 2, FP 2, FN 1; class 1: predicted once, never present; class 2: present twice, never
    # predicted; class 3: absent from both
    target = torch.tensor([0, 0, 0, 2, 2])
    pred = torch.tensor([0, 0, 1, 0, 0])
    conf = ev.confusion_matrix(pred, target, 4)
    s = ev.semantic_scores(conf)
    pc = s['per_class']
    assert pc['iou'][0] == pytest.approx(2 / 5)                        # TP 2 / (2 + FP 2 + FN 1)
    assert pc['precision'][0] == pytest.approx(2 / 4) and pc['recall'][0] == pytest.approx(2 / 3)
    assert pc['fdr'][0] == pytest.approx(2 / 4)
    p, r = 0.5, 2 / 3
    assert pc['fbeta'][0] == pytest.approx(1.3 * p * r / (0.3 * p + r))
    assert (pc['iou'][1], pc['precision'][1], pc['recall'][1], pc['fbeta'][1], pc['fdr'][1]) == (0, 0, 0, 0, 1)
    assert (pc['iou'][2], pc['precision'][2], pc['recall'][2], pc['fbeta'][2]) == (0, 0, 0, 0)
    assert pc['fdr'][2] is None                                        # nothing predicted: no discovery to rate
    assert all(pc[k][3] is None for k in pc)                           # absent from both: no score
    assert s['miou'] == pytest.approx((2 / 5 + 0 + 0) / 3)             # mean over the 3 seen classes
    assert s['fdr'] == pytest.approx((0.5 + 1) / 2)                    # over the 2 predicted classes
    with pytest.raises(ValueError):
        ev.semantic_scores(torch.zeros(3, 3, dtype=torch.int64))


def test_semantic_scores_equal_direct_per_class_loops():
    g = torch.Generator().manual_seed(0)
    C = 6
    target = torch.randint(0, C - 1, (3, 17, 13), generator=g)        # class C-1 never in the target
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.randint(0, C - 2, (3, 17, 13), generator=g)           # classes C-2, C-1 never predicted
    s = ev.semantic_scores(ev.confusion_matrix(pred, target, C), beta2=0.3)
    valid = target != 255
    ious, fbs, fdrs = [], [], []
    for c in range(C):
        t, p = (target == c) & valid, (pred == c) & valid
        tp, fp, fn = (t & p).sum().item(), (~t & p).sum().item(), (t & ~p).sum().item()
        if tp + fp + fn == 0:
            assert s['per_class']['iou'][c] is None
            continue
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        fb = 1.3 * prec * rec / (0.3 * prec + rec) if prec + rec else 0.0
        fdr = fp / (tp + fp) if tp + fp else None
        ious.append(tp / (tp + fp + fn)), fbs.append(fb)
        fdrs += [fdr] if fdr is not None else []
        assert s['per_class']['iou'][c] == pytest.approx(ious[-1])
        assert s['per_class']['precision'][c] == pytest.approx(prec)
        assert s['per_class']['recall'][c] == pytest.approx(rec)
        assert s['per_class']['fbeta'][c] == pytest.approx(fb)
        assert s['per_class']['fdr'][c] == (None if fdr is None else pytest.approx(fdr))
    assert s['per_class']['iou'][C - 1] is None and len(ious) == C - 1 and len(fdrs) == C - 2
    assert s['miou'] == pytest.approx(sum(ious) / len(ious))
    assert s['fbeta'] == pytest.approx(sum(fbs) / len(fbs))
    assert s['fdr'] == pytest.approx(sum(fdrs) / len(fdrs))


# Tables 9-11, CAVP row (AVSBench-Semantics, 71 classes in the tables' order, background first), in %
PAPER_IOU = """91.68 92.29 92.91 0 42.12 25.80 33.76 24.81 80.96 11.94 34.86 37.86 49.68 54.90 1.80 0 70.88 32.59 41.41
29.87 51.54 75.97 63.29 58.98 33.58 47.61 16.91 68.41 81.72 30.59 55.87 60.75 88.85 0 64.73 77.62 70.78 25.06 78.00
67.97 83.28 43.00 83.92 0 10.63 64.87 11.58 61.78 62.47 65.18 56.25 51.41 10.69 65.52 47.23 63.57 63.83 65.14 62.26
49.22 94.27 64.15 19.48 38.39 82.49 70.38 0 56.80 60.05 85.10 41.57"""
PAPER_F = """95.28 95.79 95.05 0 63.93 50.19 50.94 38.87 88.46 29.30 42.37 46.06 61.65 71.43 5.35 0 84.54 56.69 62.58 52.30
70.24 80.76 72.69 74.65 65.53 73.21 28.21 81.27 90.53 54.33 73.52 68.54 94.27 0 76.16 87.25 86.98 34.30 87.83 78.84
89.58 62.17 92.23 0 29.81 86.05 24.03 81.34 73.46 83.11 80.37 70.85 20.74 80.23 56.39 77.70 73.87 83.15 71.88 56.50
97.10 74.91 48.30 64.86 88.40 83.53 0 69.77 76.34 91.93 61.23"""
PAPER_FDR = """5.05 4.37 6.01 0 31.47 37.91 48.65 61.86 12.40 56.93 63.31 59.54 41.91 28.09 90.47 100 14.05 34.74 33.50
40.75 27.75 23.48 30.99 24.96 11.47 17.21 72.38 18.70 8.96 37.05 24.83 36.53 5.59 0 25.81 12.88 9.18 69.47 12.01 22.87
11.50 35.99 6.92 100 43.43 6.45 72.23 13.87 29.25 12.93 10.74 26.43 77.86 18.85 48.91 22.33 29.29 12.82 31.83 49.69
2.85 27.66 17.75 24.15 13.26 15.67 100 32.37 22.50 8.10 36.46"""


def test_class_means_recompute_the_papers_table_3_row():
    """Table 3's CAVP AVSBench-Semantics row (mIoU 50.75, F_beta 64.57, FDR 32.25) from the per-class values of
    Tables 9-11 with semantic_scores' averaging rule: IoU and F over all 71 classes (never-predicted ones as 0),
    FDR over the classes with a prediction. A printed FDR 0 next to IoU 0 (axe, harmonica) is TP = FP = 0, undefined."""
    iou, f, fdr = ([float(v) / 100 for v in t.split()] for t in (PAPER_IOU, PAPER_F, PAPER_FDR))
    assert len(iou) == len(f) == len(fdr) == 71
    fdr = [None if d == 0 and i == 0 else d for i, d in zip(iou, fdr)]
    assert fdr.count(None) == 2
    assert 100 * ev.class_mean(iou) == pytest.approx(50.75, abs=0.01)
    assert 100 * ev.class_mean(fdr) == pytest.approx(32.25, abs=0.01)
    assert 100 * ev.class_mean([d or 0.0 for d in fdr]) == pytest.approx(31.34, abs=0.01)   # zeros kept: not Table 3
    # F_beta: Table 10 averages to 63.66, not Table 3's 64.57 (nor Table 5's 62.31) under any rule that skips classes
    # by their scores; the paper's F_beta columns do not agree with each other, so there is nothing to match
    assert 100 * ev.class_mean(f) == pytest.approx(63.66, abs=0.01)
    assert 100 * ev.class_mean([v for v in f if v]) == pytest.approx(68.48, abs=0.01)
    # and semantic_scores applies that rule to a confusion matrix: class 2 is present but never predicted
    conf = torch.tensor([[5, 1, 0], [1, 3, 0], [1, 0, 0]])
    s = ev.semantic_scores(conf)
    assert s['per_class']['fdr'][2] is None and s['fdr'] == pytest.approx((2 / 7 + 1 / 4) / 2)
    assert s['miou'] == pytest.approx((5 / 8 + 3 / 5 + 0) / 3)


def test_mask_iou_hand_made():
    gt = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[1, 0, 0, 0]], [[1, 1, 1, 1]]]).bool()
    pred = torch.tensor([[[1, 0, 1, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 0]], [[1, 1, 1, 1]]]).bool()
    valid = torch.ones_like(gt)
    valid[3] = False                                                   # all-ignore image
    j = ev.mask_iou(pred, gt, valid)
    assert j[:3].tolist() == pytest.approx([1 / 3, 3 / 4, 0.0])        # empty gt: 3 of 4 predicted background
    assert torch.isnan(j[3])
    # ignored pixels do not count: the wrong prediction at pixel 2 is hidden
    v = torch.tensor([[[1, 1, 0, 1]]]).bool()
    assert ev.mask_iou(pred[:1], gt[:1], v).item() == pytest.approx(1 / 2)


def _f_reference(prob, gt, beta2=0.3):
    """Direct loop over the 255 thresholds of one image (AVSBench's thresholds)."""
    best = 0.0
    for t in torch.linspace(0, 1 - 1e-10, 255, dtype=torch.float64).tolist():
        p = prob >= t
        tp = (p & gt).sum().item()
        prec = tp / p.sum().item() if p.sum() else 0.0
        rec = tp / gt.sum().item()
        if prec + rec:
            best = max(best, (1 + beta2) * prec * rec / (beta2 * prec + rec))
    return best


def test_f_score_hand_made_and_reference():
    gt = torch.tensor([[[1, 1, 0, 0]]]).bool()
    prob = torch.tensor([[[0.9, 0.2, 0.6, 0.1]]])
    # thresholds in (0.6, 0.9]: only the 0.9 pixel is foreground: P = 1, R = 1/2
    assert ev.f_score(prob, gt).item() == pytest.approx(1.3 * 0.5 / (0.3 + 0.5))
    assert ev.f_score(gt.float(), gt).item() == pytest.approx(1.0)
    assert torch.isnan(ev.f_score(prob, torch.zeros_like(gt))).all()     # empty gt: skipped, like AVSBench
    assert torch.isnan(ev.f_score(prob, gt, valid=torch.zeros_like(gt))).all()
    g = torch.Generator().manual_seed(1)
    prob = torch.rand(4, 9, 11, generator=g)
    gt = torch.rand(4, 9, 11, generator=g) < prob                      # correlated, so F is not trivial
    f = ev.f_score(prob, gt)
    for b in range(4):
        assert f[b].item() == pytest.approx(_f_reference(prob[b], gt[b]), abs=1e-9)


def test_per_image_metrics_do_not_depend_on_batching():
    g = torch.Generator().manual_seed(2)
    prob = torch.rand(7, 10, 12, generator=g)
    gt = torch.rand(7, 10, 12, generator=g) < prob * 0.8
    gt[3] = False                                                      # an empty ground truth among them
    pred = prob > 0.5
    whole_j = ev.mask_iou(pred, gt).nanmean()
    whole_f = ev.f_score(prob, gt).nanmean()
    for sizes in ([1] * 7, [2, 5], [3, 3, 1]):
        j = torch.cat([ev.mask_iou(p, t) for p, t in zip(pred.split(sizes), gt.split(sizes))])
        f = torch.cat([ev.f_score(p, t) for p, t in zip(prob.split(sizes), gt.split(sizes))])
        assert j.nanmean().item() == pytest.approx(whole_j.item(), abs=1e-12)
        assert f.nanmean().item() == pytest.approx(whole_f.item(), abs=1e-12)


def test_format_table_lists_every_class():
    s = ev.semantic_scores(ev.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 3))
    t = ev.format_table(s, ['background', 'dog', 'cat'])
    assert '| dog | 100.00' in t and '| cat | - |' in t and '**mean**' in t

# -----------------------------------------------------------------------------------------------
# a fake dataset and model with known answers for the probes
#
# Image i is 2 x 8 pixels; each object fills whole columns. The fake image carries the class id of every
# object (channel 0) and the column position in [0, 1] (channel 1); the fake audio (A, 1, C) carries the
# loudness of each class per channel: L = (1 - alpha), R = alpha, as vpo.pan.

CLASSES = ['background', 'dog', 'cat']
EH, EW = 2, 8


class FakeDataset:
    def __init__(self, objects_per_image, cols_per_image, *, mono=False, subset='vpo_msmi'):
        self.classes, self.num_classes, self.subset, self.mono = CLASSES, len(CLASSES), subset, mono
        self.rows, self.inst = [], []
        for i, (objs, cols) in enumerate(zip(objects_per_image, cols_per_image)):
            inst = torch.zeros(EH, EW, dtype=torch.int64)
            for k, (lo, hi) in enumerate(cols):
                inst[:, lo:hi] = k + 1
            self.inst.append(inst)
            self.rows.append({'id': f'fake/{i}', 'inst': f'inst/{i}.png', 'objects': [
                dict(cls=c, alpha=(lo + hi) / 2 / EW, sounding=snd, clip=f'audio/{c}.wav')
                for (c, snd), (lo, hi) in zip(objs, cols)]})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.load(i)

    def load(self, i, *, sounding=None, audio=None, swap=False):
        objs, inst = self.rows[i]['objects'], self.inst[i]
        if sounding is None:
            sounding = [k for k, o in enumerate(objs) if o['sounding']]
        cls_map = torch.zeros(EH, EW, dtype=torch.int64)
        label = torch.zeros(EH, EW, dtype=torch.int64)
        for k, o in enumerate(objs):
            cls_map[inst == k + 1] = CLASSES.index(o['cls'])
            if k in sounding:
                label[inst == k + 1] = CLASSES.index(o['cls'])
        pos = ((torch.arange(EW) + 0.5) / EW).expand(EH, EW)
        image = torch.stack([cls_map.float(), pos, torch.zeros(EH, EW)])
        a = torch.zeros(2, 1, len(CLASSES))
        for k in sounding:
            c, alpha = CLASSES.index(objs[k]['cls']), objs[k]['alpha']
            a[0, 0, c] += 1 - alpha
            a[1, 0, c] += alpha
        if audio == 'silence':
            a.zero_()
        elif audio == 'noise':
            a.fill_(0.5)
        if swap:
            a = a.flip(0)
        if self.mono:
            a = a.sum(0, keepdim=True)
        return {'image': image, 'audio': a, 'label': label, 'index': i}


class FakeModel(nn.Module):
    """Segments a pixel's object when its class is heard; a lateralised sound (pan = R / (L + R) away from
    0.5) only counts within 0.3 of the pan position. blind=True ignores the audio (a biased model).
    Only forward(x, a): evaluate()'s fallback path; SplitFakeModel has the split API of model.CAVP."""

    def __init__(self, blind=False):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.blind, self.image_calls = blind, 0

    def _fuse(self, x, a):
        cls, pos = x[:, 0].long(), x[:, 1]                               # B, EH, EW
        energy, R = a.sum(1)[:, 0], a[:, -1, 0]                          # B, C
        pan = torch.where(energy > 0, R / energy.clamp_min(1e-9), torch.full_like(R, 0.5))
        if a.shape[1] == 1:                                              # mono: no direction
            pan = torch.full_like(pan, 0.5)
        heard = energy.gather(1, cls.flatten(1)).view_as(pos) > 0        # B, EH, EW
        p = pan.gather(1, cls.flatten(1)).view_as(pos)
        near = ((p - 0.5).abs() <= 0.1) | ((pos - p).abs() < 0.3)
        on = (cls > 0) & (self.blind | (heard & near))
        z = one_hot(torch.where(on, cls, 0)) * 10.0 + self.w             # B, C, EH, EW
        return z, heard.float()[:, None]                                 # attn: B, heads=1, h, w

    def forward(self, x, a):
        z, attn = self._fuse(x, a)
        return {'logits': z, 'z': z, 'attn': attn}


class SplitFakeModel(FakeModel):
    def forward_image(self, x):
        self.image_calls += 1
        return {'u_v': x}

    def forward_audio(self, a):
        return a

    def fuse(self, u_v, u_a):
        return self._fuse(u_v, u_a)

    def classify(self, z, size):
        assert tuple(size) == tuple(z.shape[-2:])
        return z


def one_hot(y):
    return nn.functional.one_hot(y, len(CLASSES)).permute(0, 3, 1, 2).float()   # B, H, W, C -> B, C, H, W


def make_dataset(**kw):
    # image 0: two dogs at opposite sides, the left one sounds (stereo probe; one class only: no cf)
    # image 1: a sounding dog on the left, a silent cat on the right (cf probe: the cat's audio)
    return FakeDataset([[('dog', True), ('dog', False)], [('dog', True), ('cat', False)]],
                       [[(0, 2), (6, 8)], [(0, 3), (5, 8)]], **kw)


def test_evaluate_fake_model_known_answers():
    model = SplitFakeModel()
    m = ev.evaluate(model, make_dataset(), 'cpu', progress=False)
    assert model.image_calls == 2                                      # image branch once per image
    assert m['miou'] == pytest.approx(1.0) and m['per_class']['iou'][2] is None   # cat: absent from both
    assert m['J'] == pytest.approx(1.0) and m['F'] == pytest.approx(1.0)
    assert m['cf_n'] == 1 and m['cf_miou'] == pytest.approx(1.0)
    assert m['halluc_silence'] == 0.0
    assert m['halluc_noise'] == pytest.approx((8 + 12) / 32)                # every object pixel
    assert m['stereo_n'] == 1 and m['stereo_acc'] == 1.0 and m['stereo_swap_acc'] == 1.0
    assert model.training                                              # mode restored


def test_evaluate_shared_out_over_ranks_adds_up_to_one_process(monkeypatch):
    """evaluate(rank=r, world=2) scores samples r, r + 2, ...; adding up the two ranks' running sums (what
    sum_over_ranks does with all_reduce) gives exactly the one-process metrics, probes included."""
    one = ev.evaluate(SplitFakeModel(), make_dataset(), 'cpu', progress=False)
    parts, n_images = [], []
    monkeypatch.setattr(ev, 'sum_over_ranks', lambda obj, device: parts.append(obj))
    for rank in (0, 1):
        model = SplitFakeModel()
        ev.evaluate(model, make_dataset(), 'cpu', progress=False, rank=rank, world=2)
        n_images.append(model.image_calls)
    assert n_images == [1, 1] and len(parts) == 4
    for mine, other in ((parts[0], parts[2]), (parts[1], parts[3])):   # SplitMetrics, Probes
        for name in mine.SUMS:
            a, b = getattr(mine, name), getattr(other, name)
            setattr(mine, name, {k: a[k] + b[k] for k in a} if isinstance(a, dict) else a + b)
    both = ev.semantic_scores(parts[0].conf)
    both.update(classes=one['classes'], n=one['n'], **parts[0].per_image(), **parts[1].result(), protocol='cavp')
    assert both == one


def test_evaluate_blind_model_and_fallback_path():
    m = ev.evaluate(FakeModel(blind=True), make_dataset(), 'cpu', progress=False)
    # cf on image 1: target = cat cols 5-7; prediction = dog cols 0-2 + cat cols 5-7 (ignores the audio)
    # bg: TP 4, FN 6 -> 0.4; dog: predicted, never present -> 0; cat: 1
    assert m['cf_miou'] == pytest.approx((0.4 + 0 + 1) / 3)
    assert m['halluc_silence'] == pytest.approx(20 / 32)
    assert m['stereo_acc'] == 0.0 and m['stereo_swap_acc'] == 0.0    # both dogs covered: no preference
    same = ev.evaluate(FakeModel(), make_dataset(), 'cpu', progress=False)
    assert same == ev.evaluate(SplitFakeModel(), make_dataset(), 'cpu', progress=False)


def test_evaluate_stereo_probe_on_msmi_only_mono_included():
    m = ev.evaluate(SplitFakeModel(), make_dataset(subset='vpo_ms'), 'cpu', progress=False)
    assert m['stereo_acc'] is None and m['stereo_swap_acc'] is None and m['stereo_n'] == 0
    assert m['cf_miou'] is not None
    # a mono model hears the same L + R before and after the swap: it cannot follow the source to the mirror
    m = ev.evaluate(SplitFakeModel(), make_dataset(mono=True), 'cpu', progress=False)
    assert m['stereo_n'] == 1 and m['stereo_swap_acc'] == 0.0 and m['cf_miou'] is not None
    m = ev.evaluate(SplitFakeModel(), make_dataset(), 'cpu', probes=False, max_samples=1, progress=False)
    assert m['n'] == 1 and m['cf_miou'] is None and m['halluc_noise'] is None


def test_evaluate_without_instance_maps():
    # the official release has no instance map: only the probes that keep the sounding objects run
    ds = make_dataset()
    for row in ds.rows:
        row['inst'] = None
    m = ev.evaluate(SplitFakeModel(), ds, 'cpu', progress=False)
    assert m['cf_miou'] is None and m['cf_n'] == 0 and m['stereo_n'] == 0
    assert m['cf_skipped'] == {'no instance map': 2, 'no clip': 0} and m['stereo_skipped'] == {'no instance map': 2}
    assert m['halluc_noise'] == pytest.approx(20 / 32) and m['miou'] == pytest.approx(1.0)


def test_counterfactual_and_mirror_choice():
    o = lambda c, s, a=0.5: dict(cls=c, sounding=s, alpha=a, clip=f'{c}.wav')
    assert ev.counterfactual_class([o('dog', True), o('dog', False)]) is None
    assert ev.counterfactual_class([o('dog', True), o('cat', False), o('cow', False)]) == 'cat'
    assert ev.counterfactual_class([o('dog', True), o('cat', True)]) == 'cat'       # MS: all sound
    assert ev.mirror_pair([o('dog', True, 0.2), o('dog', False, 0.45), o('dog', False, 0.9), o('dog', False, 0.75)]) == (0, 3)
    assert ev.mirror_pair([o('dog', True, 0.2), o('dog', True, 0.8)]) is None       # both sound
    assert ev.mirror_pair([o('cat', True, 0.3), o('dog', True, 0.2), o('dog', False, 0.7)]) == (1, 2)


def test_probes_skip_and_count_samples_they_cannot_take():
    """vpo.py writes `clip: null` for the objects of a class without audio: the counterfactual plays another
    class that has clips, or skips the sample and counts it; the stereo probe reads its mirror's mask only."""
    o = lambda c, s, clip=True: dict(cls=c, sounding=s, alpha=0.5, clip=f'{c}.wav' if clip else None)
    assert ev.counterfactual_class([o('dog', True), o('zebra', False, False), o('cat', False)]) == 'cat'
    assert ev.counterfactual_class([o('dog', True), o('zebra', False, False), o('zebra', False, False)]) is None
    assert ev.counterfactual_class([o('dog', True), o('cat', True), o('zebra', False, False)]) == 'cat'   # MS
    assert ev.counterfactual_class([o('dog', True), o('cat', False), o('cat', False, False)]) is None
    ds = make_dataset()
    ds.rows[1]['objects'][1]['clip'] = None                  # image 1: its only other class, the cat, has no clip
    ds.rows[0]['objects'][1]['clip'] = None                  # image 0: the silent mirror dog has none either
    m = ev.evaluate(SplitFakeModel(), ds, 'cpu', progress=False)
    assert m['cf_n'] == 0 and m['cf_miou'] is None and m['cf_skipped'] == {'no instance map': 0, 'no clip': 1}
    assert m['stereo_n'] == 1 and m['stereo_acc'] == 1.0 and m['stereo_skipped'] == {'no instance map': 0}
    table = ev.format_table(m, CLASSES)
    assert table.endswith('\n\nprobes: cf_n 0, skipped 1 (no clip); stereo_n 1, skipped 0')
    off = ev.evaluate(SplitFakeModel(), ds, 'cpu', probes=False, progress=False)
    assert ev.format_table(off, CLASSES).endswith('probes: off')


def test_a_sample_that_fails_is_named_in_one_line():
    ds = make_dataset()
    load = ds.load

    def fail_on_1(i, **kw):
        if i == 1:
            raise TypeError('expected str\nsecond line')
        return load(i, **kw)
    ds.load = fail_on_1
    with pytest.raises(ev.SampleError, match=r'^sample 1 \(fake/1\): TypeError: expected str$'):
        ev.evaluate(SplitFakeModel(), ds, 'cpu', progress=False)


def _claim_at_once(base, barrier):
    """Child process: claim `base` at the same moment as the others and write its pid into the folder it got."""
    barrier.wait()
    path, _ = ev.claim_folder(base)
    with open(os.path.join(path, 'pid'), 'w') as f:
        f.write(str(os.getpid()))


def test_folders_claimed_at_the_same_moment_are_distinct(tmp_path):
    ctx = multiprocessing.get_context('fork')
    barrier, base = ctx.Barrier(6), str(tmp_path / 'runs' / 'same')
    procs = [ctx.Process(target=_claim_at_once, args=(base, barrier)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 6
    folders = sorted(os.listdir(tmp_path / 'runs'))
    assert folders == sorted(['same'] + [f'same-{n}' for n in range(2, 7)])
    assert sorted(int((tmp_path / 'runs' / f / 'pid').read_text()) for f in folders) == sorted(p.pid for p in procs)


def test_a_folder_has_one_writer_and_is_free_when_it_ends(tmp_path):
    base = str(tmp_path / 'run')
    path, lock = ev.claim_folder(base)
    assert path == base and (tmp_path / 'run' / '.lock').read_text() == f'{os.getpid()}\n'
    with pytest.raises(ValueError) as e:
        ev.hold_folder(path, '--resume x.pt')   # a second writer, even in the same process
    assert str(e.value).startswith(f'--resume x.pt: {base} is in use by the live process {os.getpid()}')
    assert '\n' not in str(e.value)
    second, lock2 = ev.claim_folder(base)   # held, though still empty: the next name
    assert second == f'{base}-2'
    os.close(lock)
    third, lock = ev.claim_folder(base)   # its writer ended before writing: free again
    assert third == base
    (tmp_path / 'run' / 'log.jsonl').write_text('{}\n')
    os.close(lock)
    os.close(lock2)
    path, lock = ev.claim_folder(base)   # `run` holds output now; `run-2` only a lock nobody holds
    os.close(lock)
    assert path == f'{base}-2'
    (tmp_path / 'plain').mkdir()   # an empty folder is free, as it was before there were locks
    path, lock = ev.claim_folder(str(tmp_path / 'plain'))
    os.close(lock)
    assert path == str(tmp_path / 'plain')


def test_a_held_folder_loses_the_temporaries_of_ended_writers(tmp_path, capsys):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    dead = int(dead.stdout)   # a process that has ended: what it was writing will never be renamed
    (tmp_path / 'vis').mkdir()
    stale = [tmp_path / f'last.pt.{dead}.tmp', tmp_path / 'vis' / f'val_0.png.{dead}.tmp']
    live = [tmp_path / f'metrics.json.{os.getpid()}.tmp', tmp_path / 'last.pt', tmp_path / 'notes.tmp']
    for f in stale + live:
        f.write_text('x')
    lock = ev.hold_folder(str(tmp_path), '--resume last.pt')
    os.close(lock)
    assert [f.exists() for f in stale + live] == [False, False, True, True, True]
    assert 'removed 2 temporaries of ended writers' in capsys.readouterr().out


def test_files_appear_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / 'metrics.json')
    ev.write_json(path, {'miou': 0.5})

    def broken(tmp):   # a write that fails half-way (a full disk, a kill)
        with open(tmp, 'w') as f:
            f.write('{"miou": 0.')
        raise OSError('no space left on device')
    with pytest.raises(OSError, match='no space'):
        ev.write_whole(path, broken)
    assert json.load(open(path)) == {'miou': 0.5} and os.listdir(tmp_path) == ['metrics.json']
    ev.save_image(Image.new('RGB', (4, 3)), str(tmp_path / 'a.png'))
    with Image.open(tmp_path / 'a.png') as im:
        assert im.format == 'PNG' and im.size == (4, 3)
    with pytest.raises(ValueError, match=r'a\.xyz: unknown picture extension'):
        ev.save_image(Image.new('RGB', (4, 3)), str(tmp_path / 'a.xyz'))
    assert sorted(os.listdir(tmp_path)) == ['a.png', 'metrics.json']


def test_vis_writes_pngs(tmp_path):
    ev.evaluate(SplitFakeModel(), make_dataset(), 'cpu', vis=2, vis_dir=str(tmp_path), progress=False)
    files = sorted(os.listdir(tmp_path))
    assert files == ['00000.png', '00001.png']
    im = Image.open(tmp_path / '00001.png')
    assert im.width == 4 * ev.PANEL_W and im.height > 2 * ev.TITLE_H   # 4 panels a row, 2 rows


# -----------------------------------------------------------------------------------------------
# --protocol avsbench: AVSBench's own test numbers, hand-computed from its definitions


class FrameDataset:
    """AVSBench-like rows (subset, video, frame) whose image carries the prediction in channel 0: the foreground
    logit (binary, FrameModel) or the predicted class (AVSS). videos: [(name, row subset, [(channel 0, label)])]."""

    def __init__(self, subset, videos, num_classes=2):
        self.subset, self.num_classes, self.classes = subset, num_classes, [f'c{k}' for k in range(num_classes)]
        self.rows, self.items = [], []
        for name, sub, frames in videos:
            for k, (x, y) in enumerate(frames):
                self.rows.append(dict(subset=sub, category=None, video=name, frame=k))
                self.items.append((torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        x, y = self.items[i]
        return {'image': x.expand(3, *x.shape).clone(), 'audio': torch.zeros(1, 1, 1), 'label': y}


class FrameModel(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.C = num_classes

    def forward(self, x, a):
        v = x[:, 0]
        if self.C == 2:   # logits (0, l): sigmoid(l) is the foreground probability
            z = torch.stack([torch.zeros_like(v), v], 1)
        else:
            z = 10.0 * F.one_hot(v.long(), self.C).permute(0, 3, 1, 2).float()
        return {'logits': z, 'attn': torch.zeros(x.shape[0], 1, 1, 1)}


logit = lambda *p: [[math.log(q / (1 - q)) for q in p]]     # a 1 x len(p) frame of foreground probabilities p
# F-curves of two 1 x 2 frames, ground truth [1, 0] (P = 1/2, R = 1 gives F = 1.3 * 0.5 / 1.15 = 13 / 23):
# A, probabilities (0.9, 0.45): 13/23 for t <= 0.45, 1 up to 0.9 (max 1); J of > 0.5 = 1
# B, probabilities (0.3, 0.6):  13/23 for t <= 0.3, then 0 (P = 0; max 13/23); J = 0 (only the wrong pixel)
FRAME_A, FRAME_B = (logit(0.9, 0.45), [[1, 0]]), (logit(0.3, 0.6), [[1, 0]])


def avsbench(ds, **kw):
    m = ev.evaluate(FrameModel(ds.num_classes), ds, 'cpu', progress=False, protocol='avsbench', **kw)
    return m, m['avsbench']


def test_avsbench_f_depends_on_the_test_batch():
    """4 videos of 5 frames (A, B, A, B): at batch 1 (5 frames) F is the mean of the per-video maxima 18/23; at the
    default 4 videos (20 frames) the averaged curve peaks at 13/23 (at t <= 0.3; above it 13/46 or 1/2); J 1/2
    either way. At 3 videos the batches are (A, B, A), peak 2/3 on (0.45, 0.9], and (B): F = (2/3 + 13/23) / 2,
    and J is the mean of the two batch means, (2/3 + 0) / 2, not the frame mean."""
    ds = FrameDataset('s4', [(v, 's4', [frame] * 5) for v, frame in zip('abcd', (FRAME_A, FRAME_B) * 2)])
    m, one = avsbench(ds, test_batch=1)
    assert (one['J'], one['F'], one['batches']) == (pytest.approx(1 / 2), pytest.approx(18 / 23), 4)
    _, twenty = avsbench(ds)
    assert twenty['test_batch'] == ev.AVSBENCH_TEST_BATCH == 4 and twenty['batches'] == 1 and twenty['frames'] == 20
    assert (twenty['J'], twenty['F']) == (pytest.approx(1 / 2), pytest.approx(13 / 23))
    _, three = avsbench(ds, test_batch=3)
    assert (three['J'], three['F']) == (pytest.approx(1 / 3), pytest.approx((2 / 3 + 13 / 23) / 2))
    # ours, from the same predictions: per image, whatever the batch
    assert (m['protocol'], m['J'], m['F']) == ('cavp', pytest.approx(1 / 2), pytest.approx(18 / 23))


def test_avsbench_empty_ground_truth_rule():
    """A frame with no foreground: J = the share of its pixels predicted background; it leaves the batch's F-curve,
    and a batch with no foreground at all scores F = 0 and still counts."""
    empty = (logit(0.9, 0.3), [[0, 0]])                      # one of 2 pixels predicted foreground: J = 1/2
    ds = FrameDataset('ms3', [('a', 'ms3', [FRAME_A]), ('e', 'ms3', [empty])])
    m, one = avsbench(ds, test_batch=1)
    assert (one['J'], one['F']) == (pytest.approx(3 / 4), pytest.approx(1 / 2))   # F: (1 + 0) / 2
    _, both = avsbench(ds, test_batch=2)
    assert (both['J'], both['F']) == (pytest.approx(3 / 4), pytest.approx(1.0))   # A's curve alone
    assert m['F'] == pytest.approx(1.0)                      # ours skips the empty frame's F
    j, fg, curve = ev.avsbench_frames(torch.tensor([[[0.0, 0.0], [0.0, 5.0]]]), torch.tensor([[0, 0]]))
    assert (j.item(), fg.item(), curve.abs().sum().item()) == (0.5, False, 0.0)


def test_avss_padding_counted_and_unseen_classes_zero():
    """A v1s clip of 5 frames S, ground truth (0, 3, 3, 0, 255), prediction (7, 3, 0, 0, 3), padded to 10 as the
    official loader does, and a v2 clip of 10 all-background frames predicted right. Per S frame: background IoU
    1/3, F 1/2; class 3 IoU 1/3 (the 255 pixel's prediction counts, not as ground truth), F 1/2; class 7 (predicted,
    absent) 0. The 5 padded frames are background predicted right (1 each): background J = (5/3 + 5 + 10) / 20 =
    5/6, F = (5/2 + 5 + 10) / 20 = 7/8. The mean is over all 71 classes, the 67 never seen as 0."""
    s = ([[7, 3, 0, 0, 3]], [[0, 3, 3, 0, 255]])
    z = ([[0] * 5], [[0] * 5])
    ds = FrameDataset('avss', [('s', 'v1s', [s] * 5), ('z', 'v2', [z] * 10)], num_classes=71)
    _, a = avsbench(ds)
    assert (a['frames'], a['padded_frames']) == (15, 5)
    pc = a['per_class']
    assert (pc['J'][0], pc['F'][0], pc['frames'][0]) == (pytest.approx(5 / 6), pytest.approx(7 / 8), 20)
    assert (pc['J'][3], pc['F'][3], pc['frames'][3]) == (pytest.approx(1 / 3), pytest.approx(1 / 2), 5)
    assert (pc['J'][7], pc['F'][7], pc['frames'][7]) == (0.0, 0.0, 5)
    assert (pc['J'][5], pc['F'][5], pc['frames'][5]) == (None, None, 0) and pc['frames'].count(0) == 68
    assert a['J'] == pytest.approx((5 / 6 + 1 / 3) / 71) and a['F'] == pytest.approx((7 / 8 + 1 / 2) / 71)
    _, v2 = avsbench(FrameDataset('avss', [('z', 'v2', [z] * 10)], num_classes=71))
    assert v2['padded_frames'] == 0 and v2['J'] == pytest.approx(1 / 71)          # a 10-frame clip: no padding
    table = ev.report({'avsbench': a}, ds.classes)
    assert table.startswith('protocol avsbench') and '| **mean of 71** | 1.64 | 1.94 | 15 + 5 padded |' in table


def test_avsbench_sums_over_ranks_add_up_to_one_process(monkeypatch):
    """Each rank fills its own frames (S4 / MS3) or class sums (AVSS); adding them up gives the one-process numbers."""
    for ds in (FrameDataset('s4', [(v, 's4', [f] * 2) for v, f in zip('abc', (FRAME_A, FRAME_B, FRAME_A))]),
               FrameDataset('avss', [('s', 'v1s', [([[7, 3, 0]], [[0, 3, 3]])] * 3)], num_classes=71)):
        _, one = avsbench(ds, test_batch=2)
        parts = []
        monkeypatch.setattr(ev, 'sum_over_ranks', lambda obj, device: parts.append(obj))
        for rank in (0, 1):
            ev.evaluate(FrameModel(ds.num_classes), ds, 'cpu', progress=False, rank=rank, world=2,
                        protocol='avsbench', test_batch=2)
        mine, other = parts[2], parts[5]                     # SplitMetrics, Probes, AVSBenchScores per rank
        for name in mine.SUMS:
            setattr(mine, name, getattr(mine, name) + getattr(other, name))
        assert mine.result() == one
        monkeypatch.undo()


def test_protocol_arguments_are_checked():
    assert ev.resolve_test_batch('cavp', None, 'vpo_ss') is None
    assert ev.resolve_test_batch('avsbench', None, 's4') == 4 and ev.resolve_test_batch('avsbench', 1, 'avss') == 1
    for args, message in ((('avsbench', None, 'vpo_ss'), r'--protocol avsbench: .*s4, ms3, avss, not vpo_ss'),
                          (('avsbench', 0, 'ms3'), r'--test-batch 0: expected >= 1'),
                          (('cavp', 4, 's4'), r'--test-batch 4: only with --protocol avsbench'),
                          (('voc', None, 's4'), r'--protocol voc')):
        with pytest.raises(ValueError, match=message):
            ev.resolve_test_batch(*args)
    with pytest.raises(ValueError, match='--protocol avsbench'):
        ev.evaluate(SplitFakeModel(), make_dataset(), 'cpu', progress=False, protocol='avsbench')


# -----------------------------------------------------------------------------------------------
# checkpoints

ARGS = dict(data='vpo_ss', root='data', backbone='resnet50', output_stride=8, attn='sigmoid', heads=4, mono=False,
            audio_seconds=3.0, audio_backbone='resnet18', num_classes=3, dim=16)


class TinyCAVP(nn.Module):
    def __init__(self, *, num_classes, audio_channels, **kw):
        super().__init__()
        self.head = nn.Conv2d(4, num_classes, 1)
        self.audio = nn.Linear(audio_channels, 4)
        self.kw = kw


def test_load_checkpoint_round_trip_and_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'model', types.SimpleNamespace(CAVP=TinyCAVP))
    path = str(tmp_path / 'best.pt')
    net = TinyCAVP(num_classes=3, audio_channels=2)
    torch.save({'model': net.state_dict(), 'args': ARGS, 'epoch': 3, 'best': 0.5}, path)
    model, args = ev.load_checkpoint(path, 'cpu', data='vpo_ss', num_classes=3, mono=False)
    assert args == ARGS and not model.training and model.kw['attn'] == 'sigmoid' and model.kw['dim'] == 16
    assert torch.equal(model.head.weight, net.head.weight)
    with pytest.raises(FileNotFoundError, match='nope.pt'):
        ev.load_checkpoint(str(tmp_path / 'nope.pt'), 'cpu')
    with pytest.raises(ValueError, match=r"data='vpo_ss'.*--data.*'vpo_ms'"):
        ev.load_checkpoint(path, 'cpu', data='vpo_ms')
    with pytest.raises(ValueError, match='num_classes=3.*class count.*22'):
        ev.load_checkpoint(path, 'cpu', num_classes=22)
    with pytest.raises(ValueError, match='stereo checkpoint.*drop --mono'):
        ev.load_checkpoint(path, 'cpu', mono=True)
    torch.save({'model': TinyCAVP(num_classes=5, audio_channels=2).state_dict(), 'args': ARGS}, path)
    with pytest.raises(ValueError, match='do not fit'):
        ev.load_checkpoint(path, 'cpu')
    torch.save({'model': {}, 'args': {k: v for k, v in ARGS.items() if k != 'heads'}}, path)
    with pytest.raises(ValueError, match='heads'):
        ev.load_checkpoint(path, 'cpu')


# -----------------------------------------------------------------------------------------------
# checkpoints

SMALL = dict(backbone='resnet10', audio_backbone='resnet10', output_stride=16, dim=76, num_classes=22)
SMALL_ARGS = dict(SMALL, data='vpo_ss', root='data', mono=False, attn='sigmoid', heads=4, audio_seconds=0.4,
                  test_scale=1.0, resize=None)


class Opaque:
    """A Python object a checkpoint must not carry."""


@pytest.fixture(scope='module')
def small_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = model.CAVP(**SMALL).eval()
    path = str(tmp_path_factory.mktemp('ckpt') / 'best.pt')
    torch.save({'model': net.state_dict(), 'args': SMALL_ARGS, 'epoch': 3, 'rng': {'numpy': torch.arange(4)}}, path)
    return path, net


@pytest.mark.parametrize('case, message', [
    ('missing', r'--ckpt .*nope\.pt: no such file'),
    ('empty', r'--ckpt .*bad\.pt: empty file'),
    ('truncated', r'--ckpt .*bad\.pt: truncated or corrupt'),
    ('random', r'--ckpt .*bad\.pt: not a torch checkpoint'),
    ('object', r'--ckpt .*bad\.pt holds arbitrary Python objects \(.*Opaque\); it is refused because loading it '
               r'could run code'),
    ('list', r"--ckpt .*bad\.pt: not a train\.py checkpoint .*'model'.*'args'"),
    ('nan', r'--ckpt .*bad\.pt: model weight head\.bias has non-finite values'),
])
def test_read_checkpoint_refuses_bad_files_in_one_line(tmp_path, case, message):
    good, bad = tmp_path / 'good.pt', tmp_path / 'bad.pt'
    torch.save({'model': {'head.weight': torch.ones(3, 4), 'head.bias': torch.zeros(3)}, 'args': {}}, good)
    raw = good.read_bytes()
    if case == 'empty':
        bad.write_bytes(b'')
    elif case == 'truncated':
        bad.write_bytes(raw[:len(raw) // 2])
    elif case == 'random':
        bad.write_bytes(np.random.default_rng(0).bytes(2000))
    elif case == 'object':
        torch.save({'model': {}, 'args': {'data': Opaque()}}, bad)
    elif case == 'list':
        torch.save([torch.ones(2)], bad)
    elif case == 'nan':
        torch.save({'model': {'head.weight': torch.ones(3, 4), 'head.bias': torch.tensor([0.0, float('nan'), 1.0])},
                    'args': {}}, bad)
    path = str(tmp_path / 'nope.pt') if case == 'missing' else str(bad)
    with pytest.raises(FileNotFoundError if case == 'missing' else ValueError, match=message) as e:
        ev.read_checkpoint(path)
    assert '\n' not in str(e.value)
    with pytest.raises(FileNotFoundError if case == 'missing' else ValueError, match='^--resume '):
        ev.read_checkpoint(path, flag='--resume')


def test_load_checkpoint_real_cavp_round_trip(small_ckpt):
    path, net = small_ckpt
    loaded, args = ev.load_checkpoint(path, 'cpu', data='vpo_ss', num_classes=22, mono=False)
    assert args == SMALL_ARGS and not loaded.training
    x, a = torch.randn(2, 3, 32, 40), torch.randn(2, 2, 40, 64)
    with torch.no_grad():
        want, got = net(x, a), loaded(x, a)
    assert torch.equal(want['logits'], got['logits']) and torch.equal(want['attn'], got['attn'])

def test_evaluate_claims_its_default_folder_and_refuses_a_held_out(small_ckpt, tiny_root, tmp_path, capsys):
    """evaluate.py --ckpt makes a new folder per evaluation, as train.py does (two at once never share one), and
    --out into a folder another process writes is refused in one line."""
    ckpt = tmp_path / 'run' / 'best.pt'
    ckpt.parent.mkdir()
    shutil.copy(small_ckpt[0], ckpt)
    args = ['--ckpt', str(ckpt), '--root', tiny_root, '--max-samples', '1', '--no-probes', '--vis', '1',
            '--device', 'cpu']
    ev.main(args)
    ev.main(args)
    first, second = tmp_path / 'run' / 'eval_vpo_ss_test', tmp_path / 'run' / 'eval_vpo_ss_test-2'
    for d in (first, second):
        assert sorted(os.listdir(d)) == ['.lock', 'metrics.json', 'per_class.md', 'vis']
        assert os.listdir(d / 'vis') == ['00000.png']
    assert json.load(open(first / 'metrics.json')) == json.load(open(second / 'metrics.json'))
    capsys.readouterr()
    held = ev.hold_folder(str(first), 'test')
    try:
        with pytest.raises(SystemExit) as e:
            ev.main(args + ['--out', str(first)])
    finally:
        os.close(held)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1
    assert err.startswith(f'error: --out: {first} is in use by the live process {os.getpid()}')


def test_protocol_avsbench_of_a_vpo_checkpoint_is_one_line(small_ckpt, capsys):
    for extra, message in ((['--protocol', 'avsbench'], "--protocol avsbench: AVSBench's test is for --data s4, ms3, "
                                                         "avss, not vpo_ss"),
                           (['--test-batch', '2'], '--test-batch 2: only with --protocol avsbench (the cavp metrics '
                                                   'do not depend on batching)')):
        with pytest.raises(SystemExit):
            ev.main(['--ckpt', small_ckpt[0], '--device', 'cpu', *extra])
        assert capsys.readouterr().err == f'error: {message}\n'

# -----------------------------------------------------------------------------------------------
# --summary


def _run(root, name, metrics, **args):
    folder = root / name
    folder.mkdir()
    base = dict(data='vpo_ss', contrast='cavp', tau=0.1, mono=False, scale=[0.35, 0.7], seed=0, name=name,
                out=str(root), vis=8, workers=1, resume=None)
    (folder / 'metrics.json').write_text(json.dumps({**metrics, 'args': {**base, **args}}))
    return str(folder)


def test_summary_groups_seeds_with_mean_and_sample_std(tmp_path):
    runs = [_run(tmp_path, 'a0', dict(miou=0.5, fbeta=0.2, halluc_silence=0.1, stereo_acc=None), seed=0),
            _run(tmp_path, 'b0', dict(miou=0.4, fbeta=0.3, halluc_silence=0.2, stereo_acc=None), contrast='none'),
            _run(tmp_path, 'a1', dict(miou=0.6, fbeta=0.4, halluc_silence=0.3, stereo_acc=None), seed=1, workers=4),
            _run(tmp_path, 'a2', dict(miou=0.7, fbeta=0.6, stereo_acc=None), seed=2, vis=0, resume='x/best.pt',
                 test_only=True),
            _run(tmp_path, 'c0', dict(miou=0.9, fbeta=0.9, halluc_silence=0.0, stereo_acc=None), contrast='none',
                 mono=True)]
    lines = ev.summary_table(runs).splitlines()
    assert lines[0] == '| setting | n | miou | fbeta | halluc_silence |'       # stereo_acc: never present
    assert len(lines) == 2 + 3
    # only contrast and mono tell the groups apart (tau, scale, seed, workers, vis, resume, test_only do not)
    assert lines[2] == '| `--contrast cavp (no --mono)` | 3 | 0.600 ± 0.100 | 0.400 ± 0.200 | 0.200 ± 0.141 (2) |'
    assert lines[3] == '| `--contrast none (no --mono)` | 1 | 0.400 ± - | 0.300 ± - | 0.200 ± - |'
    assert lines[4] == '| `--contrast none --mono` | 1 | 0.900 ± - | 0.900 ± - | 0.000 ± - |'


def test_summary_cli_and_missing_metrics(tmp_path, capsys):
    run = _run(tmp_path, 'a0', dict(miou=0.5))
    ev.main(['--summary', run])
    assert capsys.readouterr().out.splitlines()[2] == '| `all runs` | 1 | 0.500 ± - |'
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit) as e:
        ev.main(['--summary', run, str(tmp_path / 'empty')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and err.startswith('error: --summary ')
    assert str(tmp_path / 'empty') in err and 'metrics.json' in err

# -----------------------------------------------------------------------------------------------
# your own image and sound


def _tone(seconds, sr, hz=440.0):
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _files(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / 'rgb.png')
    sf.write(tmp_path / 'short.wav', _tone(0.1, 22050), 22050)                        # mono, shorter than 0.4 s
    sf.write(tmp_path / 'long.flac', np.stack([_tone(1.0, 16000), _tone(1.0, 16000, 900)], 1), 16000)  # stereo
    return str(tmp_path / 'rgb.png'), [str(tmp_path / 'short.wav'), str(tmp_path / 'long.flac')]


def test_predict_picture_and_one_line_per_clip(small_ckpt, tmp_path, capsys):
    image, clips = _files(tmp_path)
    out = str(tmp_path / 'pred.png')
    ev.main(['--ckpt', small_ckpt[0], '--image', image, '--audio', *clips, '--out', out, '--device', 'cpu'])
    lines = capsys.readouterr().out.splitlines()
    assert [sum(line.startswith(c + ': ') for line in lines) for c in clips] == [1, 1]
    assert len(lines) == 4 and lines[2].startswith('silence: ') and lines[3] == f'wrote {out}'
    # the image, then a row per audio (2 clips + silence): prediction over the image | attention
    h = round(30 * ev.PANEL_W / 40) + ev.TITLE_H
    assert Image.open(out).size == (2 * ev.PANEL_W, 4 * h)


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'I;16'])
def test_predict_any_image_mode_at_its_own_resolution(small_ckpt, tmp_path, mode):
    image, clips = _files(tmp_path)
    rgb = Image.open(image)
    other = str(tmp_path / f'other.{"tif" if mode == "I;16" else "png"}')
    (rgb.convert('L').convert('I;16') if mode == 'I;16' else rgb.convert(mode)).save(other)
    model_, args = ev.load_checkpoint(small_ckpt[0], 'cpu')
    inp = ev.predict_inputs(other, clips[:1], dict(args, test_scale=0.5))
    assert inp['image'].shape == (1, 3, 15, 20) and inp['size'] == (30, 40)      # test_scale 0.5: half size
    lines = ev.predict(model_, args, other, clips[:1], device='cpu', out=str(tmp_path / 'p.png'))
    assert len(lines) == 2 and Image.open(tmp_path / 'p.png').width == 2 * ev.PANEL_W


def test_mono_clip_panned_at_alpha_into_a_stereo_model(tmp_path):
    image, clips = _files(tmp_path)
    floor = -1.0                                              # logmel of exact silence: 20 log10(1e-5) / 100
    left = ev.predict_inputs(image, clips[:1], SMALL_ARGS, alpha=0.0)['audio']
    right = ev.predict_inputs(image, clips[:1], SMALL_ARGS, alpha=1.0)['audio']
    centre = ev.predict_inputs(image, clips[:1], SMALL_ARGS)['audio']
    assert left.shape == (2, 2, 40, 64)                       # clip + silence, A = 2, 0.4 s = 40 frames
    assert left[0, 0].max() > floor + 0.5 and torch.all(left[0, 1] == floor)
    assert right[0, 1].max() > floor + 0.5 and torch.all(right[0, 0] == floor)
    assert torch.allclose(centre[0, 0], centre[0, 1]) and torch.all(centre[1] == floor)   # centre; silence
    # a stereo clip is taken as recorded, whatever --alpha; a mono model gets one plane
    stereo = ev.predict_inputs(image, clips[1:], SMALL_ARGS, alpha=0.0)['audio']
    assert not torch.allclose(stereo[0, 0], stereo[0, 1]) and stereo[0, 1].max() > floor + 0.5
    assert ev.predict_inputs(image, clips, dict(SMALL_ARGS, mono=True))['audio'].shape == (3, 1, 40, 64)


def test_read_audio_keeps_channels_and_agrees_with_read_clip(tmp_path):
    _, (short, long) = _files(tmp_path)
    for path, channels in ((short, 1), (long, 2)):
        w = ev.read_audio(path, 0.4)
        assert w.shape == (channels, 6400)
        assert np.allclose(w.mean(0), data.read_clip(path, 0.4), atol=1e-5)   # same window, resampling, tiling
    w = ev.read_audio(long, 0.4)                               # the centre 0.4 s of each channel
    centre = slice((16000 - 6400) // 2, (16000 + 6400) // 2)
    assert np.allclose(w[0], _tone(1.0, 16000)[centre], atol=1e-4)                      # 16-bit FLAC
    assert np.allclose(w[1], _tone(1.0, 16000, 900)[centre], atol=1e-4)


@pytest.mark.parametrize('what', ['missing clip', 'empty clip', 'text as clip', 'missing image', 'text as image',
                                  'other data', 'alpha'])
def test_predict_bad_input_is_one_line(small_ckpt, tmp_path, capsys, what):
    image, clips = _files(tmp_path)
    (tmp_path / 'empty.wav').write_bytes(b'')
    (tmp_path / 'notes.txt').write_text('not a sound, not an image\n')
    bad = {'missing clip': str(tmp_path / 'gone.wav'), 'empty clip': str(tmp_path / 'empty.wav'),
           'text as clip': str(tmp_path / 'notes.txt'), 'missing image': str(tmp_path / 'gone.png'),
           'text as image': str(tmp_path / 'notes.txt')}.get(what)
    argv = ['--ckpt', small_ckpt[0], '--image', image, '--audio', *clips, '--out', str(tmp_path / 'p.png')]
    if what.endswith('clip'):
        argv[argv.index('--audio') + 2] = bad
    elif what.endswith('image'):
        argv[argv.index('--image') + 1] = bad
    elif what == 'other data':
        argv += ['--data', 'vpo_msmi']
    else:
        argv += ['--alpha', '1.5']
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and err.startswith('error: ')
    expect = {'other data': "data='vpo_ss'.*--data asks for 'vpo_msmi'", 'alpha': '--alpha 1.5'}.get(what, bad)
    assert re.search(expect, err), err
    assert not os.path.exists(tmp_path / 'p.png')


def test_class_count_of_another_dataset_is_named():
    with pytest.raises(ValueError, match='checkpoint has 5 classes, but --data vpo_ss has 22'):
        ev.class_names(dict(SMALL_ARGS, num_classes=5))
    assert ev.class_names(dict(SMALL_ARGS, data='s4', num_classes=2)) == ['background', 'foreground']


# -----------------------------------------------------------------------------------------------
# your own video


def _video(path, seconds=3.0, fps=10, sound=None, sr=16000, size=(32, 24), rotation=0):
    """A video written with PyAV: frame k is a striped picture at brightness 8 k, and `sound` ((channels, n) float32
    at sr; None: no sound track) its track, 16-bit PCM in .mkv (decoded bit-exact), AAC in .mp4; `rotation`: the
    display matrix's counter-clockwise turn, as phones store portrait video."""
    import av
    with av.open(str(path), 'w') as out:
        vs = out.add_stream('libx264', rate=fps)
        vs.width, vs.height, vs.pix_fmt = size[0], size[1], 'yuv420p'
        if rotation:
            vs.set_display_rotation(rotation)
        layout, pcm = ('mono', 'stereo')[len(sound) - 1] if sound is not None else None, str(path).endswith('.mkv')
        st = out.add_stream('pcm_s16le' if pcm else 'aac', rate=sr, layout=layout) if layout else None
        stripes = (np.arange(size[1])[:, None, None] // 4 % 2 * 40 + np.zeros((1, size[0], 3))).astype(np.uint8)
        for k in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(stripes + np.uint8(8 * k), format='rgb24')
            frame.pts = k
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        if st is not None:
            for s in range(0, sound.shape[1], 1024):
                x = sound[:, s:s + 1024]
                x = (x.T.reshape(1, -1) * 32768).round().astype(np.int16) if pcm else np.ascontiguousarray(x)
                frame = av.AudioFrame.from_ndarray(x, format='s16' if pcm else 'fltp', layout=layout)
                frame.sample_rate, frame.pts = sr, s
                out.mux(st.encode(frame))
            out.mux(st.encode(None))
    return str(path)


def _pcm(x):
    """float32 samples as 16-bit PCM holds them."""
    return (np.round(np.asarray(x, np.float32) * 32768).clip(-32768, 32767) / 32768).astype(np.float32)


def _pictures(path):
    import av
    with av.open(path) as c:
        return [f.to_image() for f in c.decode(video=0)]


def _frames(path, seconds=0.4, **kw):
    frames = ev.VideoFrames(path, seconds, **kw)
    try:
        return list(frames)
    finally:
        frames.close()


def test_video_frames_at_fps_each_with_the_window_centred_on_its_time(tmp_path):
    sound = _pcm(np.random.default_rng(0).uniform(-0.5, 0.5, (1, 48000)))     # 3 s: every window is unique
    path = _video(tmp_path / 'noise.mkv', sound=sound)
    pictures, L = _pictures(path), 6400                                         # 30 frames at 10 fps; 0.4 s
    for kw, times in [(dict(fps=1), [0, 1, 2]), (dict(fps=2), [0, 0.5, 1, 1.5, 2, 2.5]),
                      (dict(fps=4, start=1, duration=1), [1, 1.25, 1.5, 1.75]),
                      (dict(fps=5, start=2.5), [2.5, 2.7, 2.9])]:
        got = _frames(path, **kw)
        assert [t for t, _, _ in got] == pytest.approx(times), kw
        for t, rgb, wave in got:
            shown = pictures[int(t * 10 + 1e-6)]                     # frame k is on screen from k / 10 s to (k + 1) / 10 s
            assert np.array_equal(np.asarray(rgb), np.asarray(shown)), (kw, t)
            s = min(max(round(t * 16000) - L // 2, 0), 48000 - L)       # centred; the first and last shifted inside
            assert wave.shape == (1, L) and np.array_equal(wave, sound[:, s:s + L]), (kw, t)


def test_sound_windows_stream_with_a_bounded_buffer():
    x = np.random.default_rng(0).standard_normal((2, 20 * 16000)).astype(np.float32)    # 20 s, stereo
    L, chunk, win = 6400, 1000, ev.SoundWindows(6400, 2)
    win.first, times, peak = 0, list(np.arange(0, 20.1, 0.25)), 0
    for s in range(0, x.shape[1], chunk):
        win.add(x[:, s:s + chunk])
        peak = max(peak, win.buf.shape[1])
        while times and win.ready(times[0]):
            t = times.pop(0)
            start = min(max(round(t * 16000) - L // 2, 0), x.shape[1] - L)
            assert np.array_equal(win.window(t), x[:, start:start + L]), t
            win.drop(times[0] if times else t)
    assert times == [20.0] and peak <= L + chunk       # the last waits for the track's end; memory stays flat
    win.ended = True
    assert win.ready(20.0) and np.array_equal(win.window(20.0), x[:, -L:])     # shifted inside the track
    short = ev.SoundWindows(L, 1)                       # a track shorter than the window is tiled whole
    short.first, short.ended = 0, True
    short.add(x[:1, :1000])
    assert np.array_equal(short.window(0.0), np.tile(x[:1, :1000], 7)[:, :L])
    none = ev.SoundWindows(L, 0)                        # no track: silence
    assert none.ready(5.0) and np.array_equal(none.window(5.0), np.zeros((1, L), np.float32))


def test_video_keeps_stereo_and_pans_mono_as_the_predict_command_does(tmp_path):
    tone = _pcm(_tone(3.0, 16000)[None])                                        # 1, 48000
    L, mid = 6400, slice(16000 - 3200, 16000 + 3200)                             # the window of t = 1 s
    floor = -1.0                                                                 # log-mel of exact silence
    left = _video(tmp_path / 'left.mkv', sound=_pcm(vpo.pan(tone[0], 0.2)))      # a stereo recording, source left
    mono = _video(tmp_path / 'mono.mkv', sound=tone)
    sf.write(tmp_path / 'tone.wav', tone[0, mid], 16000, subtype='PCM_16')
    image = str(tmp_path / 'frame.png')
    _, rgb, wave = _frames(left, fps=1)[1]
    rgb.save(image)
    stereo_in = ev.network_inputs(rgb, [wave], SMALL_ARGS, alpha=0.9)['audio'][0]         # alpha: not for stereo
    predicted = ev.predict_inputs(image, [str(tmp_path / 'tone.wav')], SMALL_ARGS, alpha=0.2)['audio'][0]
    assert wave.shape == (2, L) and (stereo_in - predicted).abs().max() < 0.01            # the pan is kept
    assert not torch.allclose(stereo_in[0], stereo_in[1], atol=0.05)
    for alpha in (0.0, 1.0):
        _, rgb, wave = _frames(mono, fps=1)[1]
        got = ev.network_inputs(rgb, [wave], SMALL_ARGS, alpha=alpha)['audio'][0]
        want = ev.predict_inputs(image, [str(tmp_path / 'tone.wav')], SMALL_ARGS, alpha=alpha)['audio'][0]
        assert wave.shape == (1, L) and torch.equal(got, want)
        assert torch.all(got[1 - int(alpha)] == floor) and got[int(alpha)].max() > floor + 0.5
    assert ev.network_inputs(rgb, [wave], dict(SMALL_ARGS, mono=True))['audio'].shape == (1, 1, 40, 64)


def test_video_cli_masks_equal_the_predict_command_overlay_and_summary(small_ckpt, tmp_path, capsys):
    import av
    sound = _pcm(np.random.default_rng(1).uniform(-0.5, 0.5, (2, 48000)))
    path, out = _video(tmp_path / 'clip.mkv', sound=sound), tmp_path / 'out'
    ev.main(['--ckpt', small_ckpt[0], '--video', path, '--out', str(out), '--device', 'cpu'])
    lines = capsys.readouterr().out.splitlines()
    assert [line[:8] for line in lines[:3]] == ['00:00.0 ', '00:01.0 ', '00:02.0 '] and len(lines) == 4
    assert lines[3] == f'wrote {out}/: 00000.png ... 00002.png, overlay.mp4 (1 fps, with its sound), summary.json'
    assert sorted(os.listdir(out)) == ['00000.png', '00001.png', '00002.png', 'overlay.mp4', 'summary.json']
    summary = json.loads((out / 'summary.json').read_text())
    model_, args = ev.load_checkpoint(small_ckpt[0], 'cpu')
    classes, pictures = ev.class_names(args), _pictures(path)
    for k, (row, line) in enumerate(zip(summary['frames'], lines)):
        png = Image.open(out / f'{k:05d}.png')
        mask = torch.from_numpy(np.array(png)).long()
        # the predict command on the same frame and window, from files
        pictures[10 * k].save(tmp_path / 'f.png')
        s = min(max(16000 * k - 3200, 0), 48000 - 6400)
        sf.write(tmp_path / 'w.wav', sound[:, s:s + 6400].T, 16000, subtype='PCM_16')
        preds, _ = ev.segment(model_, ev.predict_inputs(str(tmp_path / 'f.png'), [str(tmp_path / 'w.wav')], args),
                              'cpu')
        assert png.mode == 'P' and png.size == (32, 24) and torch.equal(mask, preds[0]), k
        assert row['frame'] == f'{k:05d}.png' and row['time'] == k and line == f'00:0{k}.0 {ev.describe(mask, classes)}'
        assert row['classes'] == {classes[c]: pytest.approx((mask == c).float().mean().item(), abs=1e-5)
                                  for c in mask.unique().tolist() if c > 0}
    assert summary['sound'] == 'stereo' and summary['fps'] == 1 and summary['window_seconds'] == 0.4
    with av.open(str(out / 'overlay.mp4')) as c:
        assert c.duration / 1e6 == pytest.approx(3.0, abs=0.05) and c.streams.video[0].frames == 3
        assert c.streams.audio[0].channels == 2 and float(c.streams.audio[0].duration * c.streams.audio[0].time_base) \
            == pytest.approx(3.0, abs=0.05)
        first = next(c.decode(video=0)).to_ndarray(format='rgb24').astype(float)
    want = ev.overlay(pictures[0], torch.from_numpy(np.array(Image.open(out / '00000.png'))).long())
    assert np.abs(first - want).mean() < 8                                      # the coloured masks, H.264-compressed
    # a shorter run into the same folder replaces every file; masks of the longer run do not linger
    ev.main(['--ckpt', small_ckpt[0], '--video', path, '--out', str(out), '--device', 'cpu', '--fps', '2',
             '--start', '1', '--duration', '1'])
    assert sorted(os.listdir(out)) == ['00000.png', '00001.png', 'overlay.mp4', 'summary.json']
    assert [r['time'] for r in json.loads((out / 'summary.json').read_text())['frames']] == [1.0, 1.5]
    with av.open(str(out / 'overlay.mp4')) as c:
        assert c.duration / 1e6 == pytest.approx(1.0, abs=0.05) and c.streams.video[0].frames == 2


def test_video_without_sound_says_so_once(small_ckpt, tmp_path, capsys):
    import av
    path = _video(tmp_path / 'silent.mp4', seconds=2.0)
    assert all(np.array_equal(w, np.zeros((1, 6400), np.float32)) for _, _, w in _frames(path))
    ev.main(['--ckpt', small_ckpt[0], '--video', path, '--out', str(tmp_path / 'o'), '--device', 'cpu'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f'note: --video {path} has no sound track: every window is silence' and len(lines) == 4
    assert not any(line.startswith('note') for line in lines[1:])
    with av.open(str(tmp_path / 'o' / 'overlay.mp4')) as c:
        assert not c.streams.audio and c.streams.video[0].frames == 2


def test_video_frames_turned_upright(tmp_path):
    pictures = _pictures(_video(tmp_path / 'flat.mp4', seconds=1.0))
    for rotation in (90, -90):
        (_, rgb, _), = _frames(_video(tmp_path / f'r{rotation}.mp4', seconds=1.0, rotation=rotation))
        assert rgb.size == (24, 32)                                  # portrait
        assert np.array_equal(np.asarray(rgb), np.asarray(pictures[0].rotate(rotation, expand=True)))
        stripes = np.asarray(rgb)[0, :, 0]                            # the horizontal stripes now run vertically
        assert stripes[0] != stripes[4] and len(set(np.asarray(rgb)[:, 0, 0])) == 1


def test_video_clock():
    assert [ev.clock(t) for t in (0, 3.04, 63.5, 59.96, 3600 + 61.2)] == ['00:00.0', '00:03.0', '01:03.5', '01:00.0',
                                                                          '1:01:01.2']


@pytest.mark.parametrize('what', ['missing', 'empty', 'text', 'sound only', 'photo', 'no frames', 'start', 'fps',
                                  'out', 'fails midway'])
def test_video_bad_input_is_one_line_and_leaves_nothing(small_ckpt, tmp_path, capsys, monkeypatch, what):
    import av
    path, out = _video(tmp_path / 'v.mp4', seconds=2.0, sound=_tone(2.0, 16000)[None]), tmp_path / 'out'
    (tmp_path / 'empty.mp4').write_bytes(b'')
    (tmp_path / 'notes.txt').write_text('not a video\n')
    sf.write(tmp_path / 'sound.wav', _tone(1.0, 16000), 16000)
    Image.new('RGB', (32, 24), (9, 99, 199)).save(tmp_path / 'photo.jpg')
    with av.open(str(tmp_path / 'none.mkv'), 'w') as c:                # a video stream that never starts
        vs = c.add_stream('libx264', rate=10)
        vs.width, vs.height, vs.pix_fmt = 32, 24, 'yuv420p'
        c.start_encoding()
    argv = ['--ckpt', small_ckpt[0], '--video', path, '--out', str(out), '--device', 'cpu']
    video = {'missing': 'gone.mp4', 'empty': 'empty.mp4', 'text': 'notes.txt', 'sound only': 'sound.wav',
             'photo': 'photo.jpg', 'no frames': 'none.mkv'}.get(what)
    if video:
        argv[3] = str(tmp_path / video)
    argv += {'start': ['--start', '2.5'], 'fps': ['--fps', '0']}.get(what, [])
    if what == 'out':
        argv[5] = str(tmp_path / 'notes.txt' / 'out')                  # under a file: cannot be made
    if what == 'fails midway':                                         # the disk fills after the first frame
        calls = []

        def segment(model_, inp, device, amp_dtype=None):
            calls.append(inp)
            if len(calls) > 1:
                raise OSError(28, 'No space left on device')
            return torch.ones(1, *inp['size'], dtype=torch.long), None
        monkeypatch.setattr(ev, 'segment', segment)
        out.mkdir()
        (out / 'mine.txt').write_text('kept')
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert e.value.code == 2 and err.count('\n') == 1 and err.startswith('error: '), err
    expect = {'missing': 'gone.mp4: no such file', 'empty': r'empty\.mp4: empty file', 'text': 'notes.txt: not a video',
              'sound only': r'sound\.wav: no video stream \(a sound file\?\)', 'no frames': 'none.mkv: holds no',
              'photo': r'photo\.jpg: a still image \(segment it with --image',
              'start': r'--start 2\.5: after the end of --video .*v\.mp4 \(2\.0 s\)', 'fps': '--fps 0',
              'out': r'--out .*notes\.txt/out: cannot write there', 'fails midway': 'No space left on device'}[what]
    assert re.search(expect, err), err
    assert 'wrote' not in captured.out
    assert sorted(os.listdir(out)) == ['mine.txt'] if what == 'fails midway' else not out.exists()


# ====================================================================================================
# Tables 1-3: AVSBench loaders and VGGish (data.py, model.py)
# ====================================================================================================

def _augment(image, label, **kw):
    img, lab, _ = joint_augment(image, Image.fromarray(label), **kw)
    return normalise(img), torch.from_numpy(np.array(lab, dtype=np.int64))

SR = 16000
KEYS = {'image', 'audio', 'wave', 'label', 't', 'index', 'bank_wave', 'bank_cls', 'bank_alpha'}
FH, FW = 24, 32            # frame size of the fixtures (h, w)


# ----------------------------------------------------------------------------- fixture writers
def _frame(path, seed):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (FH, FW, 3), dtype=np.uint8)).save(path)


def _box(value, fill=0, box=(4, 12, 6, 20)):
    a = np.full((FH, FW), fill, np.uint8)
    a[box[0]:box[1], box[2]:box[3]] = value
    return a


def _save(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def _ramp_wav(path, seconds, sr=SR):
    """Float wav whose sample n holds n / 1e6: a segment's first value tells where it was cut."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, (np.arange(int(seconds * sr)) / 1e6).astype(np.float32), sr, subtype='FLOAT')


def _csv(path, header, rows):
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows([header] + rows)


@pytest.fixture(scope='module')
def s4_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('Single-source'))
    videos = [('a1', 'dog_barking', 'train', 5), ('a2', 'male_speech', 'train', 5),
              ('b1', 'dog_barking', 'val', 5), ('c1', 'lawn_mowing', 'test', 3.5)]
    _csv(os.path.join(root, 's4_meta_data.csv'), ['name', 'start', 'category', 'split'],
         [[n, 0, c, s] for n, c, s, _ in videos])
    for k, (n, c, s, sec) in enumerate(videos):
        for i in range(1, 6):
            _frame(os.path.join(root, 's4_data', 'visual_frames', s, c, n, f'{n}_{i}.png'), 10 * k + i)
        for i in ([1] if s == 'train' else range(1, 6)):   # released S4 train: first frame only
            _save(os.path.join(root, 's4_data', 'gt_masks', s, c, n, f'{n}_{i}.png'),
                  Image.fromarray(_box(255), 'L'))
        _ramp_wav(os.path.join(root, 's4_data', 'audio_wav', s, c, n + '.wav'), sec)
    return root


@pytest.fixture(scope='module')
def ms3_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('Multi-sources'))
    videos = [('m1', 'train'), ('m2', 'val'), ('m3', 'test')]
    # header deliberately not 'name': the name is read by position, as the official loaders do
    _csv(os.path.join(root, 'ms3_meta_data.csv'), ['video_id', 'split'], [list(v) for v in videos])
    for k, (n, s) in enumerate(videos):
        for i in range(1, 6):
            _frame(os.path.join(root, 'ms3_data', 'visual_frames', n, f'{n}.mp4_{i}.png'), 100 + 10 * k + i)
            # frame 3 is silent (no sounding object): an empty mask
            _save(os.path.join(root, 'ms3_data', 'gt_masks', s, n, f'{n}_{i}.png'),
                  Image.fromarray(_box(0 if i == 3 else 255), 'L'))
        _ramp_wav(os.path.join(root, 'ms3_data', 'audio_wav', s, n + '.wav'), 5)
    return root


def _index_png(a):
    img = Image.fromarray(a, 'P')
    img.putpalette(palette(256).flatten().tolist())
    return img


@pytest.fixture(scope='module')
def avss_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('AVSS'))
    names = ['background'] + [f'class{j:02d}' for j in range(1, 71)]
    with open(os.path.join(root, 'label2idx.json'), 'w') as f:   # key order shuffled on purpose
        json.dump({n: j for j, n in reversed(list(enumerate(names)))}, f)
    videos = [('s_tr', 'v1s', 'train'), ('s_te', 'v1s', 'test'), ('m_te', 'v1m', 'test'),
              ('v_tr', 'v2', 'train'), ('v_va', 'v2', 'val'), ('v_te', 'v2', 'test')]
    _csv(os.path.join(root, 'metadata.csv'), ['vid', 'uid', 's_min', 's_sec', 'a_obj', 'split', 'label'],
         [[u[:3], u, 0, 0, 'x', s, sub] for u, sub, s in videos])
    for k, (u, sub, s) in enumerate(videos):
        n = 5 if sub != 'v2' else 10
        base = os.path.join(root, sub, u)
        for i in range(n):
            _frame(os.path.join(base, 'frames', f'{i}.jpg'), 1000 + 10 * k + i)
        for i in ([0] if (sub, s) == ('v1s', 'train') else range(n)):
            a = _box(3 + i)                                  # class 3 + i, frame-dependent
            if sub == 'v1m':
                a[14:20, 22:30] = 40                         # a second sounding class
            a[0, 0] = 255                                    # an ignore pixel
            _save(os.path.join(base, 'labels_semantic', f'{i}.png'), _index_png(a))
        if sub == 'v1m':                                     # 8 kHz audio: exercises resampling
            os.makedirs(base, exist_ok=True)
            sf.write(os.path.join(base, 'audio.wav'),
                     np.sin(2 * np.pi * 1000 * np.arange(5 * 8000) / 8000).astype(np.float32) * 0.5, 8000)
        else:
            _ramp_wav(os.path.join(base, 'audio.wav'), n)
    return root


# ----------------------------------------------------------------------------- VGGish front-end
def _reference_logmel(w):
    """VGGish log-mel written out loop by loop from its published definition (numpy, float64)."""
    n_frames = 1 + (len(w) - 400) // 160
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)            # periodic
    spec = np.stack([np.abs(np.fft.rfft(w[160 * j:160 * j + 400] * hann, 512)) for j in range(n_frames)])
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)                         # noqa: E731
    bin_mel = mel(np.arange(257) * 8000.0 / 256)
    edges = np.linspace(mel(125.0), mel(7500.0), 66)
    m = np.zeros((257, 64))
    for b in range(64):
        lo, c, hi = edges[b:b + 3]
        for f in range(1, 257):                                              # DC bin excluded
            if lo < bin_mel[f] <= c:
                m[f, b] = (bin_mel[f] - lo) / (c - lo)
            elif c < bin_mel[f] < hi:
                m[f, b] = (hi - bin_mel[f]) / (hi - c)
    lm = np.log(spec @ m + 0.01)
    n = n_frames // 96
    return lm[:n * 96].reshape(n, 96, 64)


def test_vggish_logmel_matches_reference():
    w = np.random.default_rng(0).uniform(-0.5, 0.5, 2 * EXAMPLE_HOP + EXAMPLE_SAMPLES + 100)
    out = vggish_logmel(torch.from_numpy(w).float())
    ref = _reference_logmel(w.astype(np.float32).astype(np.float64))
    assert out.shape == (3, 96, 64) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-4)


def test_vggish_logmel_tone_lands_in_its_band():
    f0 = 1000.0
    w = 0.5 * np.sin(2 * np.pi * f0 * np.arange(EXAMPLE_SAMPLES) / SR)
    band = vggish_logmel(w)[0].mean(0).argmax().item()
    centres = np.linspace(1127 * np.log(1 + 125 / 700), 1127 * np.log(1 + 7500 / 700), 66)[1:-1]
    assert band == int(np.abs(centres - 1127 * np.log(1 + f0 / 700)).argmin())


def test_vggish_logmel_example_k_is_the_cut_segment():
    # justifies cutting the frame's segment before the log-mel: same patch as the whole-clip call
    w = torch.from_numpy(np.random.default_rng(1).normal(0, 0.1, 5 * SR)).float()
    whole = vggish_logmel(w)
    assert whole.shape == (5, 96, 64)                                        # 5 s -> 5 examples (as AVSBench)
    for k in range(5):
        part = vggish_logmel(w[k * EXAMPLE_HOP:k * EXAMPLE_HOP + EXAMPLE_SAMPLES])
        assert (part[0] - whole[k]).abs().max() < 1e-5


def test_vggish_logmel_batched_and_too_short():
    w = torch.randn(2, 3, EXAMPLE_SAMPLES + EXAMPLE_HOP) * 0.1
    out = vggish_logmel(w)
    assert out.shape == (2, 3, 2, 96, 64)
    assert (out[1, 2] - vggish_logmel(w[1, 2])).abs().max() < 1e-5             # batched == single
    with pytest.raises(ValueError, match='15600'):
        vggish_logmel(torch.zeros(EXAMPLE_SAMPLES - 1))


# ----------------------------------------------------------------------------- VGGish network
# torchvggish key names and shapes, written out independently of vggish.py
TORCHVGGISH_SHAPES = {
    'features.0.weight': (64, 1, 3, 3), 'features.0.bias': (64,),
    'features.3.weight': (128, 64, 3, 3), 'features.3.bias': (128,),
    'features.6.weight': (256, 128, 3, 3), 'features.6.bias': (256,),
    'features.8.weight': (256, 256, 3, 3), 'features.8.bias': (256,),
    'features.11.weight': (512, 256, 3, 3), 'features.11.bias': (512,),
    'features.13.weight': (512, 512, 3, 3), 'features.13.bias': (512,),
    'embeddings.0.weight': (4096, 12288), 'embeddings.0.bias': (4096,),
    'embeddings.2.weight': (4096, 4096), 'embeddings.2.bias': (4096,),
    'embeddings.4.weight': (128, 4096), 'embeddings.4.bias': (128,)}


def _random_torchvggish(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in TORCHVGGISH_SHAPES.items():
        if k in ('embeddings.0.weight', 'embeddings.2.weight'):
            # the two big matrices are random per row, broadcast along the row: a small file
            sd[k] = (torch.randn(shape[0], 1, generator=g) * 0.01).expand(shape)
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.05
    return sd


@pytest.fixture(scope='module')
def vggish_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('w') / 'vggish-random.pth')
    sd = _random_torchvggish()
    sd['pproc.pca_matrix'], sd['pproc.pca_means'] = torch.eye(128), torch.zeros(128, 1)
    torch.save(sd, path)
    return path


def test_vggish_strict_load_of_torchvggish_state_dict(vggish_ckpt):
    sd = _random_torchvggish()
    m = VGGish(weights=vggish_ckpt, freeze=True)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == TORCHVGGISH_SHAPES
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert not any(p.requires_grad for p in m.parameters())                  # frozen
    a = torch.randn(3, 1, 96, 64)
    out = m(a)
    assert out.shape == (3, VGGish.out_dim) == (3, 128) and (out >= 0).all()   # final ReLU kept
    assert ((m(a[1:2]) - out[1:2]).abs() <= 1e-4 * (1 + out[1:2].abs())).all()  # batched == single
    m.load_state_dict(sd, strict=True)                                       # the plain strict load too


def test_vggish_flattens_in_tensorflow_hwc_order(vggish_ckpt):
    m = VGGish(weights=vggish_ckpt)
    assert all(p.requires_grad for p in m.parameters())                      # fine-tuned unless frozen
    c, h, w = 7, 5, 3                                                        # HWC index 11783, CHW index 191
    with torch.no_grad():
        for lin in (m.embeddings[0], m.embeddings[2], m.embeddings[4]):
            lin.weight.zero_()
            lin.bias.zero_()
        m.embeddings[0].weight[0, (h * 4 + w) * 512 + c] = 1.0
        m.embeddings[2].weight[0, 0] = 1.0
        m.embeddings[4].weight[0, 0] = 1.0
    f = torch.zeros(1, 512, 6, 4)
    f[0, c, h, w] = 1.0
    m.features.register_forward_hook(lambda mod, inp, out: f)               # replace the conv output
    assert m(torch.zeros(1, 1, 96, 64))[0, 0].item() == 1.0
    with pytest.raises(ValueError, match=r'\(B, 1, 96, 64\)'):
        m(torch.zeros(1, 96, 64))


def test_vggish_bad_weights_fail_clearly(tmp_path):
    missing = {k: v for k, v in _random_torchvggish().items() if k != 'embeddings.4.bias'}
    torch.save(missing, tmp_path / 'missing.pth')
    with pytest.raises(ValueError, match=r'missing.pth.*missing \[\'embeddings.4.bias\'\]'):
        VGGish(weights=str(tmp_path / 'missing.pth'))
    wrong = dict(_random_torchvggish(), **{'embeddings.4.weight': torch.zeros(64, 4096)})
    torch.save(wrong, tmp_path / 'wrong.pth')
    with pytest.raises(ValueError, match=r'embeddings.4.weight: \(64, 4096\) != \(128, 4096\)'):
        load_vggish_weights(str(tmp_path / 'wrong.pth'))
    prefixed = {'audio_backbone.' + k: v for k, v in _random_torchvggish().items()}
    torch.save(prefixed, tmp_path / 'prefixed.pth')
    with pytest.raises(ValueError, match='unexpected'):
        load_vggish_weights(str(tmp_path / 'prefixed.pth'))
    torch.save({'pca_eigen_vectors': torch.eye(128), 'pca_means': torch.zeros(128)}, tmp_path / 'pca.pth')
    with pytest.raises(ValueError, match='PCA'):
        load_vggish_weights(str(tmp_path / 'pca.pth'))
    torch.save({'pca_eigen_vectors': np.eye(128), 'pca_means': np.zeros(128)}, tmp_path / 'pca_np.pth')
    with pytest.raises(ValueError, match='pca_np.pth.*PCA'):                # the released numpy PCA file
        load_vggish_weights(str(tmp_path / 'pca_np.pth'))
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        VGGish(weights=str(tmp_path / 'nowhere.pth'))


# ----------------------------------------------------------------------------- loaders
def _check_sample(s, num_classes, hw=(FH, FW)):
    assert set(s) == KEYS
    assert s['image'].shape == (3, *hw) and s['image'].dtype == torch.float32
    assert s['audio'].shape == (1, 96, 64) and s['audio'].dtype == torch.float32
    assert s['wave'].shape == (1, EXAMPLE_SAMPLES) and s['wave'].dtype == torch.float32
    assert s['label'].shape == hw and s['label'].dtype == torch.int64
    assert s['t'].shape == (num_classes,) and s['t'][0] == 0
    # bank fields as VPODataset returns them: tensor (L,), int, float
    assert s['bank_wave'].shape == (EXAMPLE_SAMPLES,) and s['bank_wave'].dtype == torch.float32
    assert type(s['bank_cls']) is int and s['bank_alpha'] == 0.5
    if s['t'].sum() == 1:       # a single-source frame is a memory-bank candidate
        assert s['bank_cls'] == s['t'].argmax().item() and torch.equal(s['bank_wave'], s['wave'][0])
    else:                       # none: class 0 and silence, which MemoryBank.push / bank_swap skip
        assert s['bank_cls'] == 0 and not s['bank_wave'].any()
    assert torch.equal(s['audio'], vggish_logmel(s['wave'][0]))


def test_s4_splits_labels_and_audio(s4_root):
    tr = AVSBenchDataset(s4_root, 's4', 'train')
    assert len(tr) == 2 and [r['frame'] for r in tr.rows] == [1, 1]         # train: first frame only
    assert tr.classes == ['background', 'foreground'] and tr.num_classes == 2 and tr.subset == 's4'
    va, te = AVSBenchDataset(s4_root, 's4', 'val'), AVSBenchDataset(s4_root, 's4', 'test')
    assert len(va) == 5 and len(te) == 5 and [r['frame'] for r in te.rows] == [1, 2, 3, 4, 5]
    s = va[2]
    _check_sample(s, 2)
    assert s['index'] == 2
    assert torch.equal(s['label'], torch.from_numpy(_box(1)).long())       # 0/255 -> 0/1
    assert s['t'].tolist() == [0.0, 1.0] and s['bank_cls'] == 1
    # frame 3 carries VGGish example 2: samples [2 * 15360, 2 * 15360 + 15600) of the clip
    np.testing.assert_allclose(s['wave'][0, [0, -1]].numpy(),
                               np.array([2 * EXAMPLE_HOP, 2 * EXAMPLE_HOP + EXAMPLE_SAMPLES - 1]) / 1e6,
                               rtol=1e-6)
    # c1 is 3.5 s: 3 complete examples; frames 4 and 5 repeat the last one (official S4 padding)
    firsts = [round(te[i]['wave'][0, 0].item() * 1e6) for i in range(5)]
    assert firsts == [0, EXAMPLE_HOP, 2 * EXAMPLE_HOP, 2 * EXAMPLE_HOP, 2 * EXAMPLE_HOP]
    # image is the frame, ImageNet-normalised
    raw = np.asarray(Image.open(va.rows[2]['image']).convert('RGB'), np.float32) / 255
    expect = (raw - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(s['image'].permute(1, 2, 0).numpy(), expect, atol=1e-5)


def test_ms3_every_frame_annotated_and_silent_frame(ms3_root):
    for split in ('train', 'val', 'test'):
        assert len(AVSBenchDataset(ms3_root, 'ms3', split)) == 5
    ds = AVSBenchDataset(ms3_root, 'ms3', 'train')
    s = ds[0]
    _check_sample(s, 2)
    assert set(s['label'].unique().tolist()) == {0, 1}
    silent = ds[2]                                                           # frame 3: empty mask
    _check_sample(silent, 2)
    assert silent['label'].max() == 0 and silent['t'].sum() == 0 and silent['bank_cls'] == 0


def test_avss_frames_labels_and_no_padding(avss_root):
    tr = AVSBenchDataset(avss_root, 'avss', 'train')
    assert tr.num_classes == 71 and tr.classes[0] == 'background' and tr.classes[5] == 'class05'
    # v1s train: only frame 0 is annotated; v2 train: 10 frames; nothing padded to 10
    assert [(r['video'], r['frame']) for r in tr.rows] == [('s_tr', 0)] + [('v_tr', i) for i in range(10)]
    te = AVSBenchDataset(avss_root, 'avss', 'test')
    per_video = {v: sum(r['video'] == v for r in te.rows) for v in ('s_te', 'm_te', 'v_te')}
    assert per_video == {'s_te': 5, 'm_te': 5, 'v_te': 10}                  # 5-frame clips stay 5 frames
    assert len(AVSBenchDataset(avss_root, 'avss', 'val')) == 10
    s = te[3]                                                                # s_te frame 3
    _check_sample(s, 71)
    expect = _box(3 + 3)
    expect[0, 0] = 255
    assert torch.equal(s['label'], torch.from_numpy(expect).long())
    assert s['t'].nonzero().flatten().tolist() == [6] and s['bank_cls'] == 6
    m = te[5 + 1]                                                            # m_te frame 1: two classes
    _check_sample(m, 71)
    assert m['t'].nonzero().flatten().tolist() == [4, 40] and m['bank_cls'] == 0
    # the training loop rebuilds swapped audio with the dataset's own transform (VGGish, not logmel)
    assert torch.equal(te.audio_transform(m['wave'][None]), m['audio'][None])
    # v2 frame 9 has the 10th second of a 10 s clip
    v9 = te[len(te) - 1]
    assert round(v9['wave'][0, 0].item() * 1e6) == 9 * EXAMPLE_HOP


def test_avss_subsets_for_table3(avss_root, s4_root):
    ds = AVSBenchDataset(avss_root, 'avss', 'test', subsets=('v1m',))
    assert {r['video'] for r in ds.rows} == {'m_te'} and {r['subset'] for r in ds.rows} == {'v1m'}
    # v1m audio is 8 kHz: resampled to 16 kHz, the 1 kHz tone stays in the 1 kHz band
    a = ds[0]['audio'][0].mean(0)
    centres = np.linspace(1127 * np.log(1 + 125 / 700), 1127 * np.log(1 + 7500 / 700), 66)[1:-1]
    assert a.argmax().item() == int(np.abs(centres - 1127 * np.log(1 + 1000 / 700)).argmin())
    with pytest.raises(ValueError, match='only applies to avss'):
        AVSBenchDataset(s4_root, 's4', 'test', subsets=('v1s',))
    with pytest.raises(ValueError, match='v3'):
        AVSBenchDataset(avss_root, 'avss', 'test', subsets=('v3',))


def test_mask_decoders():
    assert binary_label(Image.fromarray(_box(255), 'L')).max() == 1
    assert binary_label(Image.fromarray(_box(1), 'L')).sum() == _box(1).sum()   # 0/1 grey masks
    assert binary_label(_index_png(_box(2))).sum() == _box(1).sum()             # palette masks
    pal = palette(71)
    idx = _box(17)
    idx[0, 0] = 70
    rgb = pal[idx]
    rgb[1, 1] = (1, 2, 3)                                                      # not a class colour
    out = semantic_label(Image.fromarray(rgb, 'RGB'), pal, 'x.png')
    expect = idx.copy()
    expect[1, 1] = 255
    np.testing.assert_array_equal(out, expect)
    with pytest.raises(ValueError, match='bad.png.*71'):
        semantic_label(_index_png(_box(71)), pal, 'bad.png')


def test_resize_224_protocol(avss_root, s4_root):
    s = AVSBenchDataset(avss_root, 'avss', 'test', resize=224)[0]
    _check_sample(s, 71, hw=(224, 224))
    assert set(s['label'].unique().tolist()) <= {0, 3, 255}                 # nearest: no new values
    assert AVSBenchDataset(s4_root, 's4', 'val', resize=224)[0]['label'].shape == (224, 224)
    loader = torch.utils.data.DataLoader(AVSBenchDataset(s4_root, 's4', 'val', resize=224), batch_size=4)
    b = next(iter(loader))
    assert b['image'].shape == (4, 3, 224, 224) and b['audio'].shape == (4, 1, 96, 64)
    assert b['bank_cls'].shape == (4,) and b['bank_wave'].shape == (4, EXAMPLE_SAMPLES)


def test_train_augment_is_joint_seeded_and_pads_with_ignore(avss_root):
    ds = AVSBenchDataset(avss_root, 'avss', 'train', train=True, crop=48, seed=5)
    assert ds.crop == 48 and AVSBenchDataset(avss_root, 'avss', 'train', resize=224).crop == 224
    s = ds[(0, 1)]
    _check_sample(s, 71, hw=(48, 48))
    assert (s['label'] == 255).any()                                         # 24x32 frame < 48 crop: padded
    # a pure function of (seed, epoch, index), as VPODataset: same key, same sample; next epoch, another
    assert torch.equal(ds[(0, 1)]['image'], s['image']) and torch.equal(ds[1]['image'], s['image'])
    assert not torch.equal(ds[(1, 1)]['image'], s['image'])
    # flip / scale / crop move image and label together: red = 255 exactly on the labelled box
    img = np.zeros((FH, FW, 3), np.uint8)
    img[..., 0] = _box(255)
    seen = set()
    for seed in range(12):
        x, y = _augment(Image.fromarray(img), _box(1), crop=20, rng=np.random.default_rng(seed),
                       scale=(0.8, 1.2), jitter=0.0)
        red = x[0] * 0.229 + 0.485
        sure = (y != 255) & ((red < 0.2) | (red > 0.8))                      # off the bilinear edge
        assert x.shape == (3, 20, 20) and torch.equal((red[sure] > 0.5).long(), y[sure])
        assert sure.sum() > 0.6 * (y != 255).sum()
        # at scale 1 with a crop wider than the frame, the label is the mask, flipped or not, plus 255 pad
        _, y = _augment(Image.fromarray(img), _box(1), crop=FW + 4, rng=np.random.default_rng(seed),
                       scale=(1.0, 1.0), jitter=0.0)
        inside = y[(y != 255).any(1)][:, (y != 255).any(0)]                  # the pasted frame
        assert inside.shape == (FH, FW) and (y == 255).sum() == (FW + 4) ** 2 - FH * FW
        seen.add('flip' if torch.equal(inside, torch.from_numpy(_box(1)).long().flip(-1)) else
                 'keep' if torch.equal(inside, torch.from_numpy(_box(1)).long()) else 'other')
    assert seen == {'flip', 'keep'}


def test_missing_files_fail_clearly(s4_root, avss_root, tmp_path):
    with pytest.raises(ValueError, match='one of'):
        AVSBenchDataset(s4_root, 'vpo_ss', 'test')
    with pytest.raises(ValueError, match='split'):
        AVSBenchDataset(s4_root, 's4', 'testing')
    with pytest.raises(FileNotFoundError, match='s4_meta_data.csv'):
        AVSBenchDataset(avss_root, 's4', 'test')
    # a CSV row whose video folder is absent: the error names the CSV line and the path
    root = str(tmp_path / 'bad')
    os.makedirs(root)
    _csv(os.path.join(root, 's4_meta_data.csv'), ['name', 'start', 'category', 'split'], [['zz', 0, 'cat', 'test']])
    with pytest.raises(FileNotFoundError, match=r'visual_frames.test.cat.zz.*s4_meta_data.csv line 2, video zz'):
        AVSBenchDataset(root, 's4', 'test')
    _csv(os.path.join(root, 's4_meta_data.csv'), ['name', 'start', 'split'], [['zz', 0, 'test']])
    with pytest.raises(ValueError, match="lacks column.*category"):
        AVSBenchDataset(root, 's4', 'test')
    # a frame that vanished after indexing: named with its video and frame
    ds = AVSBenchDataset(s4_root, 's4', 'val')
    ds.rows = [dict(ds.rows[0], image=ds.rows[0]['image'].replace('_1.png', '_9.png'))]
    with pytest.raises(FileNotFoundError, match=r'b1_9.png is missing .*video b1, frame 1'):
        ds[0]
    # label2idx.json must put background at 0
    bad = str(tmp_path / 'avss')
    os.makedirs(bad)
    with open(os.path.join(bad, 'label2idx.json'), 'w') as f:
        json.dump({'dog': 0, 'background': 1}, f)
    with pytest.raises(ValueError, match='background = 0'):
        AVSBenchDataset(bad, 'avss', 'test')


def test_e2e_avsbench_trains_and_evaluates(s4_root, avss_root, tmp_path, capsys):
    """--data s4 / avss go through the same train.py loop (VGGish branch, mono, per-image J and F); --protocol
    avsbench adds AVSBench's own numbers and leaves ours as they are."""
    # S4's fixture has 2 training frames: too few for CAVP's pairing (>= 4 per process), so CE alone there
    for name, root, batch in (('s4', s4_root, ['--batch-size', '2', '--contrast', 'none']),
                              ('avss', avss_root, ['--batch-size', '4'])):
        m = train.main(['--data', name, '--root', root, '--out', str(tmp_path), '--name', name, '--crop', '32',
                        *batch, '--workers', '0', '--max-steps', '1', '--epochs', '1', '--vis', '1',
                        '--resize', '32', '--dim', '76', '--weights', 'none', '--audio-weights', 'none',
                        '--protocol', 'avsbench', *(['--test-batch', '1'] if name == 's4' else [])])
        assert m['args']['audio_backbone'] == 'vggish' and m['args']['mono']
        iou = [v for v in m['per_class']['iou'] if v is not None]
        assert m['miou'] == pytest.approx(sum(iou) / len(iou)) and len(m['per_class']['iou']) == len(m['classes'])
        assert m['J'] is not None and m['cf_miou'] is None and m['protocol'] == 'cavp'
        a = m['avsbench']
        assert a['protocol'] == 'avsbench' and 0 <= a['J'] <= 1 and 0 <= a['F'] <= 1
        want = {'test_batch': 1, 'frames': 5} if name == 's4' else {'frames': 20, 'padded_frames': 10}
        assert {k: a[k] for k in want} == want
    assert capsys.readouterr().out.count('protocol avsbench: ') == 2
    # evaluate.py on the same checkpoint: the default is ours alone, --protocol avsbench adds AVSBench's numbers
    ckpt = str(tmp_path / 's4' / 'best.pt')
    ev.main(['--ckpt', ckpt, '--mono', '--out', str(tmp_path / 'ours'), '--device', 'cpu'])
    ev.main(['--ckpt', ckpt, '--mono', '--out', str(tmp_path / 'both'), '--device', 'cpu', '--protocol', 'avsbench'])
    out = capsys.readouterr().out
    ours, both = (json.load(open(tmp_path / d / 'metrics.json')) for d in ('ours', 'both'))
    assert 'avsbench' not in ours and both.pop('avsbench')['test_batch'] == 4 and both == ours
    assert out.count('protocol cavp: ') == 1 and out.count('protocol avsbench: ') == 1 and '\navsbench: J=' in out
    with pytest.raises(SystemExit):
        ev.main(['--ckpt', ckpt, '--mono', '--device', 'cpu', '--protocol', 'avsbench', '--test-batch', '0'])
    assert capsys.readouterr().err == 'error: --test-batch 0: expected >= 1 videos per test batch\n'
