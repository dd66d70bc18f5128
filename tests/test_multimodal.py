"""Encoder-free vision and audio paths and the bidirectional image mask, against transformers'
generation path (`create_masks_for_generate`: image blocks bidirectional on sliding layers only)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from tiny import rel_err
from transformers import Gemma4UnifiedForConditionalGeneration

from gemma_mlx import make_cache
from gemma_mlx.checkpoint import load_model
from gemma_mlx.models.gemma import attention_mask

IMG, AUD, BOI, EOI, BOA, EOA = 258880, 258881, 255999, 258882, 256000, 258883
TOL = 1e-4


def image_inputs(rng, sizes, budget=12):
    """Patches and (x, y) positions for images of `sizes` (rows, cols) patch grids, padded to `budget`."""
    pv = rng.random((len(sizes), budget, 6912), dtype=np.float32)
    pos = np.full((len(sizes), budget, 2), -1, np.int64)
    for i, (rows, cols) in enumerate(sizes):
        ys, xs = np.divmod(np.arange(rows * cols), cols)
        pos[i, : rows * cols] = np.stack([xs, ys], -1)
        pv[i, rows * cols :] = 0
    return pv, pos


def prompt(rng, parts):
    """Token ids from parts: ints = that many text tokens, ("image", n), ("audio", n)."""
    ids = [2]
    for p in parts:
        if isinstance(p, int):
            ids += rng.integers(5, 500, size=p).tolist()
        elif p[0] == "image":
            ids += [BOI] + [IMG] * p[1] + [EOI % 512]  # the tiny vocab has no row 258882: use any id
        else:
            ids += [BOA] + [AUD] * p[1] + [EOA % 512]
    return np.array([[i if i < 512 or i in (IMG, AUD) else i % 512 for i in ids]])


def reference_logits(ref, ids, pv=None, pos=None, feats=None, fmask=None):
    ids_t = torch.tensor(ids)
    mm = torch.zeros_like(ids_t)
    mm[ids_t == IMG], mm[ids_t == AUD] = 1, 3
    embeds = torch.zeros((*ids.shape, ref.config.text_config.hidden_size))
    position_ids = torch.arange(ids.shape[1])[None]
    masks = Gemma4UnifiedForConditionalGeneration.create_masks_for_generate(
        ref.config, embeds, None, None, position_ids, mm_token_type_ids=mm
    )
    kw = {}
    if pv is not None:
        kw.update(pixel_values=torch.tensor(pv), image_position_ids=torch.tensor(pos))
    if feats is not None:
        kw.update(input_features=torch.tensor(feats), input_features_mask=torch.tensor(fmask))
    with torch.no_grad():
        return ref(
            input_ids=ids_t, attention_mask=masks, position_ids=position_ids, **kw
        ).logits.numpy(), masks


@pytest.fixture(scope="module")
def models(unified):
    path, ref = unified
    return load_model(path), ref


def test_vision_and_audio_embedders(models):
    model, ref = models
    rng = np.random.default_rng(0)
    pv, pos = image_inputs(rng, [(3, 4), (2, 2)])
    ours = model.embed_vision(model.vision_embedder(mx.array(pv), mx.array(pos)))
    with torch.no_grad():
        expected = ref.model.embed_vision(torch.tensor(pv), torch.tensor(pos)).pooler_output.numpy()
    assert rel_err(ours, expected) <= TOL
    feats = rng.normal(size=(2, 7, 640)).astype(np.float32) * 0.1
    with torch.no_grad():
        expected = ref.model.embed_audio(torch.tensor(feats)).numpy()
    assert rel_err(model.embed_audio(mx.array(feats)), expected) <= TOL


@pytest.mark.parametrize(
    "parts",
    [
        [5, ("image", 12), 6],
        [4, ("image", 12), 3, ("image", 4), 5],
        [3, ("audio", 7), 4],
        [2, ("image", 4), 3, ("audio", 7), 2, ("image", 12), 3],
    ],
)
def test_logits_with_media(models, parts):
    model, ref = models
    rng = np.random.default_rng(1)
    ids = prompt(rng, parts)
    sizes = [(3, 4) if p[1] == 12 else (2, 2) for p in parts if not isinstance(p, int) and p[0] == "image"]
    audios = [p[1] for p in parts if not isinstance(p, int) and p[0] == "audio"]
    pv, pos = image_inputs(rng, sizes) if sizes else (None, None)
    feats = fmask = None
    if audios:
        feats = rng.normal(size=(len(audios), max(audios) + 2, 640)).astype(np.float32)
        fmask = np.zeros(feats.shape[:2], bool)
        for i, n in enumerate(audios):
            fmask[i, :n] = True
    expected, _ = reference_logits(ref, ids, pv, pos, feats, fmask)
    kw = {}
    if pv is not None:
        kw.update(pixel_values=mx.array(pv), image_position_ids=mx.array(pos))
    if feats is not None:
        kw.update(input_features=mx.array(feats), input_features_mask=mx.array(fmask))
    ours = model(mx.array(ids), **kw)
    assert rel_err(ours, expected) <= TOL
    # the same through a cache, in one prefill and then text decode steps
    cache = make_cache(model)
    assert rel_err(model(mx.array(ids[:, :-3]), cache, **kw), expected[:, :-3]) <= TOL
    for t in range(ids.shape[1] - 3, ids.shape[1]):
        assert rel_err(model(mx.array(ids[:, t : t + 1]), cache), expected[:, t : t + 1]) <= TOL


def test_masks_match_reference(models):
    """Our sliding and full masks equal transformers' generation-path masks for a mixed prompt
    (two image blocks, audio in between; the window of 12 cuts through the 12-token block)."""
    model, ref = models
    rng = np.random.default_rng(2)
    ids = prompt(rng, [2, ("image", 4), 3, ("audio", 5), 2, ("image", 12), 3])
    _, masks = reference_logits(ref, ids, *image_inputs(rng, [(2, 2), (3, 4)]))
    _, block_ids = model.embed_inputs(mx.array(ids))
    n = ids.shape[1]
    sliding = np.array(mx.broadcast_to(attention_mask(None, n, 12, block_ids), (1, 1, n, n)))
    full = np.tril(np.ones((n, n), bool))  # our full layers use the kernel's causal mask
    for ours, key in ((sliding, "sliding_attention"), (full, "full_attention")):
        theirs = masks[key]
        if theirs is None:  # sdpa's shortcut for a plain causal mask
            theirs = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
        theirs = theirs.numpy() if theirs.dtype == torch.bool else (theirs.numpy() == 0)
        np.testing.assert_array_equal(np.broadcast_to(ours, theirs.shape), theirs)
    assert np.array(block_ids).max() == 1  # two blocks; audio is not a block


def test_soft_token_count_mismatch_is_an_error(models):
    model, _ = models
    rng = np.random.default_rng(3)
    ids = prompt(rng, [2, ("image", 5), 2])
    pv, pos = image_inputs(rng, [(2, 2)])
    with pytest.raises(ValueError, match="4 soft tokens for 5 placeholder"):
        model(mx.array(ids), pixel_values=mx.array(pv), image_position_ids=mx.array(pos))


# --- video: frames through the vision embedder into <|video|> slots, one block per frame -----

VID = 258884


def video_prompt(rng, parts, frames_tokens):
    """Ids like `prompt`, with ("video", frames) parts written as the processor writes a video:
    per frame a few timestamp tokens, then BOI + VID x n + EOI."""
    ids = [2]
    for p in parts:
        if isinstance(p, int):
            ids += rng.integers(5, 500, size=p).tolist()
        elif p[0] == "video":
            for _ in range(p[1]):
                stamp = rng.integers(5, 500, size=3).tolist()
                ids += stamp + [BOI % 512] + [VID] * frames_tokens + [EOI % 512]
        elif p[0] == "image":
            ids += [BOI % 512] + [IMG] * p[1] + [EOI % 512]
        else:
            ids += [BOA % 512] + [AUD] * p[1] + [EOA % 512]
    return np.array([ids])


def reference_video_logits(ref, ids, video, pv=None, pos=None, feats=None, fmask=None, past=None):
    ids_t = torch.tensor(ids)
    mm = torch.zeros_like(ids_t)
    mm[ids_t == IMG], mm[ids_t == VID], mm[ids_t == AUD] = 1, 2, 3
    embeds = torch.zeros((*ids.shape, ref.config.text_config.hidden_size))
    position_ids = torch.arange(ids.shape[1])[None]
    masks = Gemma4UnifiedForConditionalGeneration.create_masks_for_generate(
        ref.config, embeds, None, None, position_ids, mm_token_type_ids=mm
    )
    kw = dict(
        pixel_values_videos=torch.tensor(video.pixel_values),
        video_position_ids=torch.tensor(video.position_ids.astype(np.int64)),
        num_frames_per_video=torch.tensor([video.num_frames]),
    )
    if pv is not None:
        kw.update(pixel_values=torch.tensor(pv), image_position_ids=torch.tensor(pos))
    if feats is not None:
        kw.update(input_features=torch.tensor(feats), input_features_mask=torch.tensor(fmask))
    with torch.no_grad():
        out = ref(input_ids=ids_t, attention_mask=masks, position_ids=position_ids, use_cache=True, **kw)
    return (out.logits.numpy(), out.past_key_values) if past is not None else out.logits.numpy()


@pytest.mark.parametrize("with_image_and_audio", [False, True], ids=["video", "video+image+audio"])
def test_video_logits_and_greedy_decode(models, with_image_and_audio):
    """Logits of a prompt with a 3-frame video (real preprocessed frames), alone and with an image
    and audio, within 1e-4 of transformers; then 16 greedy steps identical."""
    from gemma_mlx.generate import generate_tokens
    from gemma_mlx.video import preprocess_video, synthetic_video

    model, ref = models
    rng = np.random.default_rng(4)
    video = preprocess_video(synthetic_video(3, 48, 96, seed=4), 70)  # 55 soft tokens per frame
    parts = [4, ("video", 3), 5]
    pv = pos = feats = fmask = None
    if with_image_and_audio:
        parts = [3, ("image", 12), 2, ("video", 3), 2, ("audio", 7), 4]
        pv, pos = image_inputs(rng, [(3, 4)])
        feats = rng.normal(size=(1, 9, 640)).astype(np.float32)
        fmask = np.zeros((1, 9), bool)
        fmask[0, :7] = True
    ids = video_prompt(rng, parts, video.num_soft_tokens)
    expected = reference_video_logits(ref, ids, video, pv, pos, feats, fmask)
    media = {
        "pixel_values_videos": mx.array(video.pixel_values),
        "video_position_ids": mx.array(video.position_ids),
    }
    if pv is not None:
        media.update(pixel_values=mx.array(pv), image_position_ids=mx.array(pos))
    if feats is not None:
        media.update(input_features=mx.array(feats), input_features_mask=mx.array(fmask))
    ours = model(mx.array(ids), **media)
    err = rel_err(ours, expected)
    print(f"video logits rel err {err:.2e}")
    assert err <= TOL
    _, blocks = model.embed_inputs(mx.array(ids), **media)
    assert np.array(blocks).max() + 1 == 3 + with_image_and_audio  # one block per frame (and image)

    tokens = generate_tokens(
        model, mx.array(ids[0]), make_cache(model), lambda logits, start=None: mx.argmax(logits, -1),
        media=media, prefill_step_size=64,
    )  # fmt: skip
    ours_greedy = [next(tokens) for _ in range(16)]
    # the reference's generation path: the prompt with its block masks, then cached text steps
    logits, cache = reference_video_logits(ref, ids, video, pv, pos, feats, fmask, past=True)
    theirs = [int(logits[0, -1].argmax())]
    with torch.no_grad():
        for step in range(15):
            position = torch.tensor([[ids.shape[1] + step]])
            out = ref(
                input_ids=torch.tensor([theirs[-1:]]),
                past_key_values=cache,
                position_ids=position,
                use_cache=True,
            )
            cache = out.past_key_values
            theirs.append(int(out.logits[0, -1].argmax()))
    assert ours_greedy == theirs
