"""Video input: decoding with PyAV, sampling and preprocessing against transformers'
`Gemma4UnifiedProcessor` (its video processor included) on clips written here with PyAV, and bad
input. The reference decodes with its own PyAV reader (`video_utils.read_video_pyav`)."""

from __future__ import annotations

import functools
import sys
from fractions import Fraction

import numpy as np
import pytest
from tiny import save_tokenizer, token_ids

av = pytest.importorskip("av")

from gemma_mlx.media import BUDGETS, MediaError
from gemma_mlx.processor import Processor
from gemma_mlx.video import (
    expand_video,
    open_video,
    preprocess_video,
    sample_indices,
    synthetic_video,
    timestamp_text,
)

PIXEL_MAX_ERR = 2 / 255  # the image path's measured bound (tests/test_media.py): the same resize


def write_clip(path, frames, fps=10, codec="libx264", pts=None, rotation=None, fmt=None):
    """Encode `frames [T, H, W, 3]` uint8; `pts` (in 1/1000 s) makes a variable-rate clip."""
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24" if codec == "png" else "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "g": "8"}  # keyframes every 8 frames: seeking has work to do
        if pts is not None:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, a in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(a, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def ref():
    """transformers' processor on the tiny tokenizer (which has Gemma 4's media tokens)."""
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")  # the reference video processor resizes with torchvision
    from transformers import (
        Gemma4UnifiedImageProcessor,
        Gemma4UnifiedProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )
    from transformers.models.gemma4_unified.video_processing_gemma4_unified import (
        Gemma4UnifiedVideoProcessor,
    )

    path = save_tokenizer(_tmp_dir())
    specials = {
        "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
        "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
    }  # fmt: skip
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"), unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=specials,
    )  # fmt: skip
    proc = Gemma4UnifiedProcessor(
        feature_extractor=Gemma4UnifiedAudioFeatureExtractor(),
        image_processor=Gemma4UnifiedImageProcessor(do_normalize=False),
        tokenizer=tok,
        video_processor=Gemma4UnifiedVideoProcessor(),
    )
    assert proc.video_token_id == token_ids(path)["<|video|>"]  # already in the vocabulary
    return proc, Processor.from_dir(path)


def _tmp_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="video-tok-"))


def reference(proc, src, text, budget=70, num_frames=None, fps=None, frames_fps=None):
    """The reference's outputs and frame timestamps for a file (decoded by its PyAV reader, sampled
    by its video processor's `sample_frames`) or pre-sampled frames (sampled by the processor)."""
    from transformers.video_utils import read_video_pyav

    vp = proc.video_processor
    # with its default num_frames (32) set, the reference ignores `fps`: sampling by rate needs it unset
    vp.num_frames = 32 if fps is None else None
    if isinstance(src, np.ndarray):
        meta = {"total_num_frames": len(src), "fps": frames_fps, "frames_indices": list(range(len(src)))}
        kw = {"num_frames": num_frames, "fps": fps}
        videos = [src]
    else:
        sampler = functools.partial(vp.sample_frames, num_frames=num_frames, fps=fps)
        videos, meta = read_video_pyav(str(src), sampler)
        videos, kw = [videos], {"do_sample_frames": False}
    out = proc(text=[text], videos=videos, video_metadata=[meta], return_tensors="np",
               videos_kwargs={"max_soft_tokens": budget, "return_metadata": True, **kw})  # fmt: skip
    sampled = vp(videos=videos, video_metadata=[meta], max_soft_tokens=budget, return_metadata=True, **kw)
    sampled = sampled["video_metadata"][0]
    sampled.fps = sampled.fps or 24  # as `replace_video_token`
    return out, sampled.timestamps


def check_parity(ref, src, budget=70, num_frames=None, fps=None, frames_fps=None, seek_above=300):
    proc, ours_proc = ref
    text = "a <|video|> b"
    expected, stamps = reference(proc, src, text, budget, num_frames, fps, frames_fps)
    video = (src, frames_fps) if isinstance(src, np.ndarray) else src
    ours = ours_proc.prepare(
        text, videos=[video], video_soft_tokens=budget, video_frames=num_frames, video_fps=fps, add_bos=False
    )  # the reference's tokenizer here adds no BOS
    v = preprocess_video(src, budget, num_frames, fps, frames_fps=frames_fps, seek_above=seek_above)
    assert ours.ids == expected["input_ids"][0].tolist()
    assert ours.num_frames_per_video == list(expected["num_frames_per_video"]) == [v.num_frames]
    np.testing.assert_array_equal(ours.video_position_ids, expected["video_position_ids"])
    np.testing.assert_array_equal(v.position_ids, expected["video_position_ids"])
    assert ours.video_timestamps == [stamps] == [v.timestamps]
    theirs = expected["pixel_values_videos"]
    assert theirs.shape == ours.pixel_values_videos.shape
    err = np.abs(theirs - ours.pixel_values_videos).max()
    assert err <= PIXEL_MAX_ERR + 1e-6 and np.abs(theirs - v.pixel_values).max() == err
    return v, err


# --- parity ----------------------------------------------------------------------------------


def test_landscape_more_frames_than_sampled(ref, tmp_path):
    clip = write_clip(tmp_path / "a.mp4", synthetic_video(40, 96, 128, seed=1))
    v, err = check_parity(ref, clip, num_frames=8)
    assert v.frame_indices == [0, 5, 10, 15, 20, 25, 30, 35] and v.num_soft_tokens == 63
    print(f"landscape: max pixel error x255 {err * 255:.2f}")


@pytest.mark.parametrize("budget", [70, 140, 280])
def test_portrait_odd_size_budgets(ref, tmp_path, budget):
    clip = write_clip(tmp_path / "p.mov", synthetic_video(6, 131, 75, seed=2), codec="png")
    v, _ = check_parity(ref, clip, budget=budget, num_frames=3)
    assert v.frame_indices == [0, 2, 4]


def test_one_frame_clip(ref, tmp_path):
    clip = write_clip(tmp_path / "one.mp4", synthetic_video(1, 64, 64, seed=3))
    v, _ = check_parity(ref, clip, num_frames=1)  # the reference refuses more frames than the clip has
    assert v.frame_indices == [0]
    assert preprocess_video(clip).frame_indices == [0]  # we give all there is instead


def test_sampling_by_fps(ref, tmp_path):
    clip = write_clip(tmp_path / "f.mp4", synthetic_video(45, 48, 96, seed=4), fps=15)
    v, _ = check_parity(ref, clip, fps=2)  # 3 s at 2 frames/s
    assert v.frame_indices == [0, 7, 15, 22, 30, 37] and v.fps == 15


def test_variable_frame_rate_clip(ref, tmp_path):
    pts = [0, 40, 80, 300, 320, 900, 1000, 1500, 1510, 2400, 2500, 3900]  # ms, irregular
    clip = write_clip(tmp_path / "vfr.mp4", synthetic_video(12, 64, 80, seed=5), pts=pts)
    v, _ = check_parity(ref, clip, num_frames=5)
    assert v.frame_indices == [0, 2, 4, 7, 9]  # by index, as the reference; times at index / fps


def test_presampled_frames_without_fps(ref):
    frames = synthetic_video(7, 50, 90, seed=6)
    v, _ = check_parity(ref, frames, num_frames=7)
    assert v.fps == 24 and v.timestamps == [i / 24 for i in range(7)]
    v, _ = check_parity(ref, frames, num_frames=3, frames_fps=0.5)  # 2 s per frame: timestamps 00:04 ...
    assert [timestamp_text(t) for t in v.timestamps] == ["00:00", "00:04", "00:08"]


def test_long_clip_is_sought_not_scanned(ref, tmp_path):
    """Seeking (forced here on 80 frames, keyframes every 8) takes the same frames as the
    reference's decoding from the start, and decodes fewer of them."""
    clip = write_clip(tmp_path / "long.mp4", synthetic_video(80, 48, 64, seed=7), fps=4)
    sought, _ = check_parity(ref, clip, num_frames=4, seek_above=10)
    scanned = preprocess_video(clip, 70, 4, seek_above=10_000)
    np.testing.assert_array_equal(sought.pixel_values, scanned.pixel_values)
    assert sought.frame_indices == [0, 20, 40, 60]


CLIPS = {  # name -> (frames, writer options, sampling (num_frames, fps))
    "landscape, more frames than sampled": (synthetic_video(40, 96, 128, seed=1), {}, (8, None)),
    "portrait, odd size": (synthetic_video(6, 131, 75, seed=2), {"codec": "png", "ext": "mov"}, (3, None)),
    "one frame": (synthetic_video(1, 64, 64, seed=3), {}, (1, None)),
    "by fps": (synthetic_video(45, 48, 96, seed=4), {"fps": 15}, (None, 2)),
    "variable frame rate": (
        synthetic_video(12, 64, 80, seed=5),
        {"pts": [0, 40, 80, 300, 320, 900, 1000, 1500, 1510, 2400, 2500, 3900]},
        (5, None),
    ),
    "sought": (synthetic_video(80, 48, 64, seed=7), {"fps": 4, "seek_above": 10}, (4, None)),
}


@pytest.mark.parametrize("case", CLIPS)
def test_decoding_and_prompt_match_reference_reader(tmp_path, case):
    """Without torchvision (the CI stack): the frames we decode and sample are bit-identical to
    those of the reference's own PyAV reader (`read_video_pyav`) sampled by its
    `default_sample_indices_fn`, and our prompt text for them is its `replace_video_token`'s."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from transformers.models.gemma4_unified.processing_gemma4_unified import (
        Gemma4UnifiedProcessor,
        get_aspect_ratio_preserving_size,
    )
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    frames, opts, (num_frames, fps) = CLIPS[case]
    opts = dict(opts)
    seek_above = opts.pop("seek_above", 300)
    path = write_clip(tmp_path / f"clip.{opts.pop('ext', 'mp4')}", frames, **opts)
    expected, meta = read_video_pyav(
        str(path), functools.partial(default_sample_indices_fn, num_frames=num_frames, fps=fps)
    )
    clip = open_video(path, seek_above=seek_above)
    indices = sample_indices(clip.total, clip.fps, num_frames, fps)
    np.testing.assert_array_equal(indices, meta.frames_indices)
    ours = np.stack(list(clip.frames(indices)))
    np.testing.assert_array_equal(ours, expected)
    v = preprocess_video(path, 70, num_frames, fps, seek_above=seek_above)
    h, w = get_aspect_ratio_preserving_size(expected.shape[1], expected.shape[2], 16, 70 * 9, 3)
    names = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    inputs = {"num_soft_tokens_per_video": [h // 48 * (w // 48)], "video_metadata": [meta]}
    assert expand_video(v) == Gemma4UnifiedProcessor.replace_video_token(names, inputs, 0)
    assert v.timestamps == meta.timestamps


def test_timestamps_in_prompt():
    assert [timestamp_text(t) for t in (0, 59.99, 60, 61.5, 3599, 3600)] == [
        "00:00", "00:59", "01:00", "01:01", "59:59", "60:00"
    ]  # fmt: skip
    v = preprocess_video(synthetic_video(3, 48, 48), 70, frames_fps=1)
    frame = "<|image>" + "<|video|>" * v.num_soft_tokens + "<image|>"
    assert expand_video(v) == f"00:00 {frame} 00:01 {frame} 00:02 {frame}" and v.num_soft_tokens == 64


def test_sample_indices_matches_reference():
    pytest.importorskip("transformers")
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    cases = [(100, 30, 32, None), (33, 10, 32, None), (7, 24, 7, None), (300, 30, None, 1),
             (301, 29.97, None, 2.5), (5, 25, None, 1)]  # fmt: skip
    for total, clip_fps, n, fps in cases:
        meta = VideoMetadata(total_num_frames=total, fps=clip_fps)
        expected = default_sample_indices_fn(meta, num_frames=n, fps=fps)
        np.testing.assert_array_equal(sample_indices(total, clip_fps, n, fps), expected)
    assert sample_indices(10, 24, 32).tolist() == list(range(10))  # clamped; the reference raises
    assert sample_indices(600, 30, 32, fps=1).tolist() == (np.arange(20) * 600 // 20).tolist()
    assert len(sample_indices(6000, 30, 32, fps=1)) == 32  # num_frames caps an fps sampling


# --- decoding ---------------------------------------------------------------------------------


def test_rotation_metadata_is_applied(tmp_path):
    frames = np.zeros((2, 48, 96, 3), np.uint8)
    frames[:, :16, :16] = (255, 0, 0)  # a red square at the top left
    clip = write_clip(tmp_path / "rot.mov", frames, codec="png", rotation=90)
    clip_frames = list(open_video(clip).frames([0]))
    assert clip_frames[0].shape == (96, 48, 3)  # displayed as portrait
    # 90 degrees counter-clockwise: the top-left corner goes to the bottom left
    np.testing.assert_array_equal(clip_frames[0], np.rot90(frames[0]))
    assert preprocess_video(clip, num_frames=1).num_soft_tokens > 0


@pytest.mark.parametrize("fmt, codec, ext", [("matroska", "libvpx-vp9", "mkv"), ("avi", "mpeg4", "avi")])
def test_other_containers(tmp_path, fmt, codec, ext):
    """Containers that do not store the frame count (Matroska) are counted by their packets."""
    clip = write_clip(tmp_path / f"c.{ext}", synthetic_video(9, 48, 64), codec=codec, fmt=fmt)
    v = preprocess_video(clip, num_frames=3)
    assert v.frame_indices == [0, 3, 6] and v.fps == 10
    data = preprocess_video(clip.read_bytes(), num_frames=3)  # bytes, as the server gets them
    np.testing.assert_array_equal(data.pixel_values, v.pixel_values)


def test_frame_lists_of_paths_and_images(tmp_path):
    from PIL import Image

    frames = synthetic_video(4, 48, 64)
    paths = []
    for i, a in enumerate(frames):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    from_paths = preprocess_video(paths, num_frames=4)
    from_images = preprocess_video([Image.fromarray(a) for a in frames], num_frames=4)
    from_array = preprocess_video(frames, num_frames=4)
    for v in (from_paths, from_images):
        np.testing.assert_array_equal(v.pixel_values, from_array.pixel_values)


# --- bad input --------------------------------------------------------------------------------


def test_bad_videos_are_named(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x01 not a video at all" * 100)
    wav = tmp_path / "sound.mp4"
    import soundfile as sf

    sf.write(str(tmp_path / "s.wav"), np.zeros(1600, np.float32), 16000)
    wav.write_bytes((tmp_path / "s.wav").read_bytes())
    good = write_clip(tmp_path / "good.mp4", synthetic_video(20, 48, 64))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    cases = [
        (junk, "junk.mp4: not a readable video"),
        (wav, "sound.mp4: no video stream"),
        (cut, "cut.mp4: not a readable video"),
        (empty, "empty.mp4: the file is empty"),
        (tmp_path / "missing.mp4", "missing.mp4: cannot read the file"),
        ([], "the video has no frames"),
        (np.zeros((0, 48, 48, 3), np.uint8), "the video has no frames"),
        (np.zeros((48, 48, 3), np.uint8), r"a video array must be \[frames, height, width, channels\]"),
        (42, "expected a video file"),
        ([np.zeros((48, 48, 3), np.uint8), np.zeros((48, 96, 3), np.uint8)], "share one size"),
    ]
    for src, match in cases:
        with pytest.raises(MediaError, match=match):
            preprocess_video(src, num_frames=4)
    with pytest.raises(MediaError, match="max_soft_tokens=100"):
        preprocess_video(good, 100)
    with pytest.raises(MediaError, match="num_frames=0"):
        preprocess_video(good, 70, 0)
    with pytest.raises(MediaError, match="fps=-1"):
        preprocess_video(good, 70, None, -1)


def test_container_without_frames(tmp_path):
    path = tmp_path / "none.mkv"
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()  # the header of a video stream, and no frame
    with pytest.raises(MediaError, match="none.mkv: (the video has no frames|not a readable video)"):
        preprocess_video(path)


def test_truncated_stream_is_refused(tmp_path):
    """A clip whose header announces more frames than its data holds (a cut download) is refused;
    Matroska, which stores no count, reads as the shorter clip it now is."""
    frames = synthetic_video(30, 48, 64)
    good = tmp_path / "g.mp4"
    with av.open(str(good), "w", options={"movflags": "faststart"}) as out:  # the index first
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for a in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        out.mux(stream.encode())
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    with pytest.raises(MediaError, match=r"cut.mp4: the clip ended after \d+ of the 30 sampled frames"):
        preprocess_video(cut, num_frames=None)
    assert preprocess_video(good, num_frames=None).num_frames == 30
    mkv = write_clip(tmp_path / "g.mkv", frames, fmt="matroska")
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(mkv.read_bytes()[: mkv.stat().st_size * 2 // 3])
    assert 0 < preprocess_video(cut, num_frames=None).num_frames < 30


def test_absurd_resolution_refused_before_decoding(tmp_path, monkeypatch):
    from gemma_mlx import media

    clip = write_clip(tmp_path / "big.mp4", synthetic_video(2, 64, 96))
    monkeypatch.setattr(media, "MAX_PIXELS", 96 * 64 - 1)
    decoded = []
    monkeypatch.setattr(av.VideoFrame, "to_ndarray", lambda *a, **k: decoded.append(1), raising=False)
    with pytest.raises(MediaError, match=r"big.mp4: 96x64 frames are larger than 6,143 pixels"):
        preprocess_video(clip)
    assert not decoded


def test_video_that_cannot_fit_the_context(tmp_path):
    clip = write_clip(tmp_path / "c.mp4", synthetic_video(40, 96, 128))
    match = r"c.mp4: 32 frames of 63 soft tokens need 2,080 tokens, .* room for 2,000"
    with pytest.raises(MediaError, match=match):
        preprocess_video(clip, token_budget=2000)
    assert preprocess_video(clip, num_frames=4, token_budget=2000).num_tokens == 4 * 65


def test_token_count_from_the_header(tmp_path):
    """What the CLI's memory check counts before loading: from the header, nothing decoded."""
    from gemma_mlx.video import video_token_count

    clip = write_clip(tmp_path / "c.mp4", synthetic_video(40, 96, 128))
    assert video_token_count(clip, 70, 8) == 8 * (63 + 2 + 7)
    assert video_token_count(clip, 280, None, fps=1) == 4 * (
        preprocess_video(clip, 280, 1).num_soft_tokens + 9
    )


def test_without_pyav_the_extra_is_named(monkeypatch, tmp_path):
    clip = write_clip(tmp_path / "c.mp4", synthetic_video(2, 48, 48))
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(MediaError, match=r"pip install 'gemma-mlx\[video\]'"):
        preprocess_video(clip)
    assert preprocess_video(synthetic_video(2, 48, 48)).num_frames == 2  # frames need no decoder


def test_tokens_per_frame_match_reference():
    """Soft tokens per frame at each budget for common frame sizes (the README's table)."""
    pytest.importorskip("transformers")
    from transformers.models.gemma4_unified.processing_gemma4_unified import get_aspect_ratio_preserving_size

    from gemma_mlx.video import frame_tokens

    for h, w in [(1080, 1920), (1920, 1080), (720, 1280), (480, 640), (2160, 3840)]:
        for b in BUDGETS:
            th, tw = get_aspect_ratio_preserving_size(h, w, 16, b * 9, 3)
            assert frame_tokens(h, w, b) == th // 48 * (tw // 48)


# --- the API, chat, CLI and server on the tiny checkpoint ---------------------------------


@pytest.fixture(scope="module")
def tiny(checkpoint):
    from gemma_mlx import load

    return checkpoint, *load(checkpoint)


def test_generate_with_a_video_part(tiny, tmp_path):
    """A chat message with a video part and a text prompt with `videos=` feed the model the same
    tensors as a direct call; the prefix-cache key gives every frame its own content hash."""
    import mlx.core as mx

    from gemma_mlx import generate
    from gemma_mlx.prompt_cache import PromptKey

    _, model, processor = tiny
    clip = write_clip(tmp_path / "v.mp4", synthetic_video(12, 64, 96, seed=8))
    messages = [
        {"role": "user", "content": [{"type": "video", "video": str(clip)}, {"type": "text", "text": "hi"}]}
    ]
    inputs = processor.prepare(messages, video_frames=3)
    assert inputs.num_frames_per_video == [3] and inputs.pixel_values_videos.shape == (3, 70, 6912)
    vid = model.config.video_token_id
    assert inputs.ids.count(vid) == 3 * preprocess_video(clip, num_frames=3).num_soft_tokens
    logits = model(mx.array([inputs.ids]), **inputs.model_kwargs())[0, -1]
    greedy = int(mx.argmax(logits).item())
    assert generate(model, processor, messages, max_tokens=1, video_frames=3).tokens == [greedy]
    key = PromptKey.of(inputs, model.config.image_token_id, model.config.audio_token_id, vid)
    frames = [b for b in key.blocks if b[2] == "video"]
    assert [b[3] for b in frames] == [0, 1, 2] and len({int(key.tokens[b[0]]) for b in frames}) == 3
    rest = key.rest_of(inputs, frames[1][0])  # a cached prefix ending before the second frame
    assert rest.model_kwargs()["pixel_values_videos"].shape[0] == 2
    with pytest.raises(
        MediaError, match=r"v.mp4: 3 frames of \d+ soft tokens need \d+ tokens, .* room for 100"
    ):
        processor.prepare(messages, video_frames=3, token_budget=100)
    with pytest.raises(MediaError, match=r"2 <\|video\|> placeholders for 1 videos"):  # before decoding
        processor.prepare("<|video|> then <|video|>", videos=[tmp_path / "not-even-there.mp4"])
    text = generate(model, processor, "Describe.", videos=[str(clip)], max_tokens=2, video_frames=3)
    assert len(text.tokens) == 2 and text.stats.prompt_tokens > 3 * 70


def test_chat_session_video(tiny, tmp_path):
    from gemma_mlx import ChatSession
    from gemma_mlx.cli.chat import command

    _, model, processor = tiny
    clip = write_clip(tmp_path / "v.mp4", synthetic_video(6, 48, 64))
    session = ChatSession(model, processor, max_tokens=2, video_frames=2)
    assert command(session, f"/video {clip}")
    assert session.pending == [{"type": "video", "video": str(clip)}]
    list(session.send("What happens?"))
    assert (
        session.tokens.count(model.config.video_token_id) == 2 * preprocess_video(clip, 70, 2).num_soft_tokens
    )
    with pytest.raises(MediaError, match="nothing.mp4: cannot read"):
        session.attach_video(tmp_path / "nothing.mp4")


def test_cli_generate_with_video(tiny, tmp_path):
    from typer.testing import CliRunner

    from gemma_mlx import generate
    from gemma_mlx.cli.app import app

    path, model, processor = tiny
    clip = write_clip(tmp_path / "v.mp4", synthetic_video(6, 48, 64))
    args = ["generate", "--model", str(path), "-n", "3", "--video", str(clip), "--video-frames", "2"]
    result = CliRunner().invoke(app, [*args, "What is it?"])
    assert result.exit_code == 0, result.output
    expected = generate(model, processor, "What is it?", videos=[str(clip)], video_frames=2, max_tokens=3)
    assert (
        result.stdout.startswith(expected.text)
        and f"{expected.stats.prompt_tokens} prompt tokens" in result.stderr
    )
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"junk" * 50)
    for extra, match in [
        (["--video", str(junk)], "junk.mp4: not a readable video"),
        (["--video", str(clip), "--video-soft-tokens", "100"], "--video-soft-tokens 100: expected one of"),
    ]:
        result = CliRunner().invoke(app, ["generate", "--model", str(path), *extra, "hi"])
        assert result.exit_code == 1 and match in result.stderr and "Traceback" not in result.output


def test_server_video_url(tiny, tmp_path):
    """`video_url` parts as a data URI and as a path under --allow-files; bad videos are 400s
    naming the part."""
    pytest.importorskip("openai")
    import base64

    import httpx
    from test_server import Server

    from gemma_mlx.server import create_app

    path, model, processor = tiny
    clip = write_clip(tmp_path / "v.mp4", synthetic_video(6, 48, 64))
    uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    server = Server(create_app(model, processor, model_id="tiny", allow_files=[tmp_path]))
    try:

        def post(url):
            body = {
                "model": "tiny",
                "max_tokens": 2,
                "temperature": 0,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "video_url", "video_url": {"url": url}},
                            {"type": "text", "text": "What is it?"},
                        ],
                    }  # fmt: skip
                ],
            }
            return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)

        messages = [{"role": "user", "content": [{"type": "video", "video": str(clip)},
                                                 {"type": "text", "text": "What is it?"}]}]  # fmt: skip
        expected = len(processor.prepare(messages).ids)
        cached = []
        for url in (uri, str(clip)):
            r = post(url)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] == expected
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        # the same frames (by content hash, file or data URI) come from the prefix cache
        assert cached[0] == 0 and cached[1] > expected - 10
        other = write_clip(tmp_path / "w.mp4", synthetic_video(6, 48, 64, seed=9))
        r = post(str(other))  # other frames: the cache stops before the first frame
        first_frame = processor.prepare(messages).ids.index(model.config.video_token_id)
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] <= first_frame
        audio = tmp_path / "a.wav"
        import soundfile as sf

        sf.write(str(audio), np.zeros(1600, np.float32), 16000)
        wav_uri = "data:video/mp4;base64," + base64.b64encode(audio.read_bytes()).decode()
        for url, match in [
            (wav_uri, "no video stream"),
            ("data:image/png;base64,aGVsbG8=", "not a video"),
            ("data:video/mp4;base64,aGVsbG8=", "not a readable video"),
            ("/etc/hosts", "outside the --allow-files"),
        ]:
            r = post(url)
            assert r.status_code == 400 and match in r.json()["error"]["message"], r.text
            assert r.json()["error"]["param"].startswith("messages[0].content[0].video_url.url")
    finally:
        server.close()


def test_video_token_from_config_when_the_tokenizer_lacks_it(tmp_path):
    """The reference adds `<|video|>` to the tokenizer at run time; a tokenizer without it gets the
    config's `video_token_id` for every placeholder."""
    import json

    from test_text import save_sp_tokenizer

    from gemma_mlx.text import ChatTemplate

    save_sp_tokenizer(tmp_path)
    frames = synthetic_video(2, 48, 48)
    plain = Processor.from_dir(tmp_path)
    assert plain.video_token_id is None
    with pytest.raises(MediaError, match="no <\\|video\\|> token"):
        plain.prepare("Look: <|video|>", videos=[frames])
    (tmp_path / "config.json").write_text(json.dumps({"video_token_id": 300}))
    p = Processor.from_dir(tmp_path)
    assert p.video_token_id == 300 and isinstance(p.chat_template, ChatTemplate)
    ids = p.prepare("Look: <|video|>", videos=[frames]).ids
    v = preprocess_video(frames)
    assert ids.count(300) == v.num_frames * v.num_soft_tokens
    assert ids[: len(p.encode_text("Look: 00:00 <|image>"))] == p.encode_text("Look: 00:00 <|image>")


def test_cli_chat_with_video(tiny, tmp_path):
    """`gemma-mlx chat --video F --video-frames 2`, then `/video` for the next message."""
    from typer.testing import CliRunner

    from gemma_mlx.cli.app import app

    path, _, _ = tiny
    clip = write_clip(tmp_path / "v.mp4", synthetic_video(6, 48, 64))
    script = "\n".join(["What is this?", f"/video {clip}", "And this?", "/stats", "/quit"]) + "\n"
    args = ["chat", "--model", str(path), "-n", "2", "-t", "0", "--video", str(clip), "--video-frames", "2"]
    result = CliRunner().invoke(app, args, input=script)
    assert result.exit_code == 0, result.output
    assert f"[video attached: {clip}]" in result.output and "prompt tokens" in result.output
    bad = CliRunner().invoke(app, [*args[:-4], "--video", str(tmp_path / "no.mp4")], input="/quit\n")
    assert bad.exit_code == 1 and "no.mp4: cannot read the file" in bad.stderr
