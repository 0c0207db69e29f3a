package org.gemma3export.logic

/**
 * The text of one reply as ExecuTorch's runner streams it, one decoded token per callback. The runner
 * streams the piece of the stop token it samples (with tokenizer.json: `<end_of_turn>` or `<eos>`) and
 * then ends without feeding it, so a stop piece ends the visible text.
 *
 * One exception, seen with ExecuTorch 1.5's TextLLMRunner: the first token, sampled by the prefill, is
 * not checked against the stop ids; a stop there is streamed, fed, and generation goes on. The runner's
 * cache then holds more than the conversation, so such a reply does not count as ended by a stop id.
 */
class ReplyStream(stopIds: List<Int>) {
    private val stopPieces: Set<String> = stopIds.map {
        GemmaChat.STOP_PIECES[it] ?: throw BundleError("Stop id $it is not one of Gemma's stop tokens (${GemmaChat.STOP_PIECES.keys}).")
    }.toSet()
    private val text = StringBuilder()
    private var stopsSeen = 0
    private var lastWasStop = false

    /** Pieces streamed so far. */
    var tokens = 0
        private set

    /**
     * True when the reply ended at its first stop piece: the runner fed every token before it and
     * nothing after, so its cache holds exactly the conversation and the next turn may send a delta.
     */
    val endedByStop: Boolean
        get() = lastWasStop && stopsSeen == 1

    /** Take one streamed piece; returns the text to show (empty for a stop piece and after one). */
    fun push(piece: String): String {
        tokens++
        lastWasStop = piece in stopPieces
        if (lastWasStop) stopsSeen++
        if (stopsSeen > 0) return ""
        text.append(piece)
        return piece
    }

    val visibleText: String get() = text.toString()
}
