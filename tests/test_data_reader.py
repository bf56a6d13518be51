"""RecordReader: EasyR1 parquet/JSONL, sharding, resume, bad-row accounting."""

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlcal_jax.data import BlockReader, RecordReader, read_examples


def _png(value: int, size=(6, 5)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def _good_jsonl(path, count):
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(json.dumps({"problem": f"q{i}", "answer": str(i), "images": []}) + "\n")


def _ids(examples):
    return [e.id for e in examples]


def test_parquet_image_forms_and_several_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png(10))
    (tmp_path / "imgs" / "b.png").write_bytes(_png(20, size=(3, 4)))
    rows = {
        "problem": ["<image>How many?", "Compare <image> and <image>.", "What is it?", "text only"],
        "answer": ["3", "B", "cat", "4"],
        "images": [
            [{"bytes": None, "path": "imgs/a.png"}],                  # HF dict with a path
            [{"bytes": _png(30), "path": None}, {"bytes": None, "path": "imgs/b.png"}],
            [{"bytes": _png(40), "path": "ignored.png"}],             # bytes win over path
            [],
        ],
        "source": ["s0", "s1", "s2", "s3"],
    }
    pq.write_table(pa.table(rows), tmp_path / "train.parquet")
    examples = read_examples(tmp_path / "train.parquet", image_dir=tmp_path, id_key=None)
    assert [e.answer for e in examples] == ["3", "B", "cat", "4"]
    assert [len(e.images) for e in examples] == [1, 2, 1, 0]
    assert examples[0].images[0].getpixel((0, 0)) == (10, 245, 7)
    assert examples[1].images[0].getpixel((0, 0)) == (30, 225, 7)
    assert examples[1].images[1].size == (3, 4)
    assert examples[2].images[0].getpixel((0, 0)) == (40, 215, 7)
    # A question without placeholders gets one per image, as EasyR1 lays single images out.
    assert examples[2].question == "<image>What is it?"
    assert examples[1].question.count("<image>") == 2
    assert examples[0].meta == {"source": "s0"}


def test_jsonl_paths_raw_bytes_columns_and_custom_keys(tmp_path):
    (tmp_path / "x.png").write_bytes(_png(50))
    with open(tmp_path / "d.jsonl", "w") as handle:
        handle.write(json.dumps({"prompt": "<image>q", "gold": 7, "pics": "x.png", "qid": "a"}) + "\n")
        handle.write("\n")  # blank lines are not rows
        handle.write(json.dumps({"prompt": "<image>r", "gold": "8", "pics": ["x.png"], "qid": "b"}))
    examples = read_examples(tmp_path / "d.jsonl", image_dir=tmp_path, prompt_key="prompt",
                             answer_key="gold", image_key="pics", id_key="qid")
    assert _ids(examples) == ["a", "b"]
    assert [e.answer for e in examples] == ["7", "8"]
    assert examples[1].images[0].getpixel((1, 1)) == (50, 205, 7)
    # Raw bytes in a parquet binary column.
    pq.write_table(pa.table({"problem": ["<image>z"], "answer": ["1"], "images": [[_png(60)]]}),
                   tmp_path / "b.parquet")
    (example,) = read_examples(tmp_path / "b.parquet")
    assert example.images[0].getpixel((0, 0)) == (60, 195, 7)


def test_two_processes_read_disjoint_shards_whose_union_is_the_dataset(tmp_path):
    _good_jsonl(tmp_path / "a.jsonl", 6)
    _good_jsonl(tmp_path / "b.jsonl", 5)  # two files: rows are addressed across both
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    shards = [list(RecordReader(files, seed=3, process_index=p, process_count=2, num_epochs=1))
              for p in range(2)]
    ids = [set(_ids(shard)) for shard in shards]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == {f"row{i}" for i in range(11)}
    assert sorted(map(len, shards)) == [5, 6]
    # Later epochs revisit the same shard in a new order.
    reader = RecordReader(files, seed=3, process_index=0, process_count=2, num_epochs=2)
    epochs = list(reader)
    first, second = _ids(epochs[:len(reader)]), _ids(epochs[len(reader):])
    assert sorted(first) == sorted(second) and first != second
    # Another seed gives another split.
    other = RecordReader(files, seed=4, process_index=0, process_count=2, num_epochs=1)
    assert set(_ids(other)) != ids[0] or len(reader) != len(other)


@pytest.mark.parametrize("stop_after", [3, 9, 14])  # mid-epoch, across an epoch boundary
def test_resume_mid_epoch_gives_the_same_next_rows(tmp_path, stop_after):
    _good_jsonl(tmp_path / "a.jsonl", 8)
    with open(tmp_path / "a.jsonl", "a") as handle:  # a bad row: skip counts are resumed too
        handle.write('{"problem": "no answer"}\n')
    kwargs = dict(seed=11, process_index=1, process_count=2)
    reference = RecordReader(tmp_path / "a.jsonl", **kwargs)
    expected = _ids(reference.take(stop_after + 6))
    reader = RecordReader(tmp_path / "a.jsonl", **kwargs)
    assert _ids(reader.take(stop_after)) == expected[:stop_after]
    state = json.loads(json.dumps(reader.state()))
    resumed = RecordReader(tmp_path / "a.jsonl", **kwargs)
    resumed.restore(state)
    assert _ids(resumed.take(6)) == expected[stop_after:]
    assert resumed.epoch_summaries[-1] == reference.epoch_summaries[len(resumed.epoch_summaries)
                                                                    + state["epoch"] - 1]


def test_restore_refuses_another_layout(tmp_path):
    _good_jsonl(tmp_path / "a.jsonl", 4)
    state = RecordReader(tmp_path / "a.jsonl", process_index=0, process_count=2).state()
    with pytest.raises(ValueError, match="shard"):
        RecordReader(tmp_path / "a.jsonl", process_index=1, process_count=2).restore(state)


def _every_bad_row_jsonl(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png(1))
    (tmp_path / "broken.png").write_bytes(_png(1)[:30])  # truncated PNG
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    good = {"problem": "<image>q", "answer": "1", "images": ["ok.png"]}
    lines = [
        json.dumps(good).encode(),
        b'{"problem": "<image>q", "answer": ',                                  # bad_record
        b"[1, 2, 3]",                                                            # bad_record
        '{"problem": "caf\u00e9", "answer": "1"}'.encode("latin-1"),            # undecodable_text
        json.dumps({"answer": "1", "images": ["ok.png"]}).encode(),              # missing_prompt
        json.dumps({"problem": "<image>q", "images": ["ok.png"]}).encode(),      # missing_answer
        json.dumps({"problem": "<image>q", "answer": "  ", "images": ["ok.png"]}).encode(),
        json.dumps({"problem": "<image>q", "answer": "1", "images": ["nope.png"]}).encode(),
        json.dumps({"problem": "<image>q", "answer": "1", "images": [None]}).encode(),
        json.dumps({"problem": "<image>q", "answer": "1", "images": ["broken.png"]}).encode(),
        json.dumps({"problem": "<image>q", "answer": "1", "images": ["garbage.png"]}).encode(),
        json.dumps({"problem": "<image><image>q", "answer": "1", "images": ["ok.png"]}).encode(),
        json.dumps({"problem": "<image>q", "answer": "1", "images": []}).encode(),
        json.dumps(good).encode(),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_kind_of_bad_row_is_skipped_counted_and_named(tmp_path, caplog):
    path = _every_bad_row_jsonl(tmp_path)
    reader = RecordReader(path, image_dir=tmp_path, shuffle=False, process_index=0,
                          process_count=1, num_epochs=1)
    with caplog.at_level(logging.INFO, logger="vlcal_jax.data"):
        examples = list(reader)
    assert _ids(examples) == ["row0", "row13"]
    assert reader.epoch_summaries == [{"epoch": 0, "examples": 2, "skipped": {
        "bad_record": 2, "undecodable_text": 1, "missing_prompt": 1, "missing_answer": 2,
        "missing_image": 2, "corrupt_image": 2, "image_placeholder_mismatch": 2}}]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    named = [w for w in warnings if w.startswith("skipping ")]
    assert len(named) == 12
    for row in range(1, 13):
        assert any(f"bad.jsonl row {row}:" in w for w in named), row
    (summary,) = [w for w in warnings if "epoch 0" in w]
    assert "2 examples from 14 rows" in summary and "12 rows skipped" in summary
    assert "missing_image=2" in summary


def test_bad_parquet_rows(tmp_path):
    rows = {
        "problem": [b"<image>ok", b"<image>\xff\xfe", b"<image>q", b"<image>q", b"<image>q"],
        "answer": ["1", "1", None, "1", "1"],
        "images": [[_png(5)], [_png(5)], [_png(5)], [b"\x89PNG garbage"], [b""]],
    }
    pq.write_table(pa.table(rows), tmp_path / "bad.parquet")
    reader = RecordReader(tmp_path / "bad.parquet", shuffle=False, process_index=0,
                          process_count=1, num_epochs=1)
    assert _ids(list(reader)) == ["row0"]
    assert reader.epoch_summaries[0]["skipped"] == {
        "undecodable_text": 1, "missing_answer": 1, "corrupt_image": 1, "missing_image": 1}


def test_prompt_length_filter(tmp_path):
    _good_jsonl(tmp_path / "a.jsonl", 4)
    examples = read_examples(tmp_path / "a.jsonl", max_prompt_length=1,
                             prompt_length_fn=lambda e: int(e.answer))
    assert _ids(examples) == ["row0", "row1"]
    with pytest.raises(ValueError, match="prompt_length_fn"):
        RecordReader(tmp_path / "a.jsonl", max_prompt_length=1, process_index=0, process_count=1)


def test_no_usable_row_is_a_clear_error(tmp_path):
    with open(tmp_path / "a.jsonl", "w") as handle:
        handle.write(json.dumps({"problem": "q"}) + "\n")
    reader = RecordReader(tmp_path / "a.jsonl", process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no usable row.*missing_answer=1"):
        next(reader)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no row"):
        RecordReader(tmp_path / "empty.jsonl", process_index=0, process_count=1)


def test_config_errors_name_the_file(tmp_path):
    pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a.parquet: no column \['problem'\]"):
        RecordReader(tmp_path / "a.parquet", process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        RecordReader(tmp_path / "missing.jsonl", process_index=0, process_count=1)


def test_shard_sizes_cover_uneven_splits():
    class Rows:  # any RowSource works, e.g. the TFDS one
        def __len__(self):
            return 7

        def row(self, index):
            return {"problem": "q", "answer": str(index)}

        def where(self, index):
            return f"row {index}"

        def keep_only(self, indices):
            pass

    seen = []
    for p in range(3):
        seen += [e.answer for e in RecordReader(Rows(), process_index=p, process_count=3,
                                                num_epochs=1, image_key=None)]
    assert sorted(seen, key=int) == [str(i) for i in range(7)]
    np.testing.assert_equal(len(seen), 7)


def test_block_reader_with_one_process_is_the_record_reader(tmp_path):
    _good_jsonl(tmp_path / "d.jsonl", 7)
    plain = RecordReader(str(tmp_path / "d.jsonl"), seed=3, process_index=0, process_count=1)
    blocks = BlockReader(str(tmp_path / "d.jsonl"), block=4, seed=3, process_index=0, process_count=1)
    assert _ids(blocks.take(20)) == _ids(plain.take(20))  # across epoch boundaries too


@pytest.mark.parametrize("processes, block", [(2, 2), (3, 1)])
def test_block_readers_of_every_process_give_the_one_process_batches(tmp_path, processes, block):
    """Step s takes `block` rows on each process; process after process they are the rows the
    one-process reader gives for step s (global batch = processes x block), and each process
    reads only rows of its own blocks."""
    _good_jsonl(tmp_path / "d.jsonl", 10)
    path = str(tmp_path / "d.jsonl")
    one = RecordReader(path, seed=1, process_index=0, process_count=1)
    readers = [BlockReader(path, block=block, seed=1, process_index=p, process_count=processes)
               for p in range(processes)]
    for _ in range(7):  # 7 steps > one epoch of 10 rows
        want = _ids(one.take(processes * block))
        assert [i for r in readers for i in _ids(r.take(block))] == want


def test_block_reader_restores_on_another_process_count(tmp_path):
    """A state saved by 2 processes after 3 steps resumes 1 process at step 4, and vice versa."""
    _good_jsonl(tmp_path / "d.jsonl", 9)
    path = str(tmp_path / "d.jsonl")
    one = BlockReader(path, block=4, seed=2, process_index=0, process_count=1)
    steps = [_ids(one.take(4)) for _ in range(5)]
    two = [BlockReader(path, block=2, seed=2, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        for r in two:
            r.take(2)
    resumed = BlockReader(path, block=4, seed=2, process_index=0, process_count=1)
    resumed.restore(two[0].state())
    assert _ids(resumed.take(4)) == steps[3]
    back = [BlockReader(path, block=2, seed=2, process_index=p, process_count=2) for p in range(2)]
    for r in back:
        r.restore(resumed.state())
    assert [i for r in back for i in _ids(r.take(2))] == steps[4]
