"""Multi-turn chat reuses the cache: turn two feeds only its new tokens and answers exactly as a
fresh runner that re-reads the whole history would, well past the sliding window."""

import io

import pytest

from gemma3_export.chat import Conversation
from gemma3_export.generate import EagerRunner, Sampling, generate
from gemma3_export.load import load_model


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny", log=lambda *_: None)


def open_runner(runtime: str, model, tiny_bundle_of):
    """A fresh runner over the tiny model: eager, or a bundle of the runtime (context 128, chunk 8)."""
    if runtime == "eager":
        return EagerRunner(model, 128, 8)
    from gemma3_export.pipeline import open_runner as open_bundle

    return open_bundle(tiny_bundle_of(runtime))


@pytest.mark.parametrize("runtime,max_new", [("eager", 5), ("eager", 25), ("onnx", 25), ("executorch", 25)])
def test_second_turn_reuses_the_cache(loaded, tiny_bundle_of, runtime, max_new):
    """The desktop twin of the apps (`gemma3-export chat`) over each runtime the phones use."""
    model, tok = loaded.model, loaded.tokenizer
    runner = open_runner(runtime, model, tiny_bundle_of)
    conv = Conversation(runner, tok)
    sampling = Sampling()
    first, _ = conv.say("The lighthouse keeper climbed the stairs.", max_new, sampling, out=io.StringIO())
    before = runner.pos
    assert before > 2 * model.config.sliding_window  # the second turn starts past the window
    ids = conv.next_ids("What did he count?")
    history = conv.fed + ids
    second, _ = conv.say("What did he count?", max_new, sampling, out=io.StringIO())
    fed_in_turn_two = conv.fed[before:before + len(ids)]
    assert fed_in_turn_two == ids  # only the new tokens were prefilled
    assert ids[0] != tok.bos_id and tok.id_of("<start_of_turn>") in ids
    fresh = open_runner(runtime, model, tiny_bundle_of)
    assert list(generate(fresh, history, max_new, tok.stop_ids, Sampling())) == second


def test_full_context_is_one_sentence(loaded):
    from gemma3_export.errors import UserError

    runner = EagerRunner(loaded.model, 48, 8)
    conv = Conversation(runner, loaded.tokenizer)
    conv.say("hello there", 10, Sampling(), out=io.StringIO())
    with pytest.raises(UserError, match="no longer fits the context"):
        conv.say("tell me more about the lighthouse and the bakery " * 3, 10, Sampling(), out=io.StringIO())


def test_a_reply_ended_by_a_stop_id_is_fully_fed(loaded):
    """When the model stops itself, every reply token is in the cache and nothing is pending."""
    from test_generate import Scripted

    tok = loaded.tokenizer
    chunks = -(-len(Conversation(None, tok).next_ids("hi")) // 4)
    pad = [0] * (chunks - 1)  # the scripted runner answers every prefill chunk too
    conv = Conversation(Scripted(pad + [40, 41, 106, 50], max_context=100, chunk=4), tok)
    reply, _ = conv.say("hi", 10, Sampling(), out=io.StringIO())
    assert reply == [40, 41] and conv.pending is None and conv.fed[-2:] == [40, 41]
    assert conv.next_ids("again")[:1] == [tok.id_of("<end_of_turn>")]
    conv2 = Conversation(Scripted(pad + [40, 41, 42], max_context=100, chunk=4), tok)
    conv2.say("hi", 2, Sampling(), out=io.StringIO())  # cut: 41 was sampled but never fed
    assert conv2.pending == 41 and conv2.fed[-1] == 40 and conv2.next_ids("again")[:2] == [41, tok.id_of("<end_of_turn>")]
