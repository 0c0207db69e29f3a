package org.gemma3export.logic

import org.junit.Assert.assertEquals
import org.junit.Test

class StopTest {
    private val stops = Vectors.load("stops.json")
    private val pieces = Vectors.load("tokens.json")["pieces"] as Map<*, *>

    @Test
    fun stopPiecesAreTheTokenizers() {
        for ((id, piece) in GemmaChat.STOP_PIECES) assertEquals(pieces[id.toString()], piece)
    }

    /** Replays what ExecuTorch's runner streams for each scripted case: every sampled token's piece up
     * to and including a stop id, or as many as its length limit allows. */
    @Test
    fun repliesEndWhereThePythonLoopEnds() {
        for (case in Vectors.cases(stops)) {
            val stopIds = Vectors.ints(case["stop_ids"])
            val emitted = Vectors.ints(case["emitted"])
            val sampled = Vectors.ints(case["sampled"])
            val stream = ReplyStream(stopIds)
            var shown = ""
            val streamed = if (case["reason"] == "stop") emitted.size + 1 else emitted.size
            for (id in sampled.take(streamed)) {
                shown += stream.push(GemmaChat.STOP_PIECES[id] ?: "·$id")
                if (id in stopIds) break
            }
            val expected = emitted.joinToString("") { GemmaChat.STOP_PIECES[it] ?: "·$it" }
            assertEquals(expected, shown)
            assertEquals(expected, stream.visibleText)
            assertEquals(case["reason"] == "stop", stream.endedByStop)
        }
    }

    /** ExecuTorch's runner does not check the prefill's token against the stop ids: a stop there is
     * streamed and fed, and generation goes on (measured with TextLLMRunner of ExecuTorch 1.5.1). */
    @Test
    fun aStopAsTheFirstTokenDoesNotLeaveTheCacheInStep() {
        val stream = ReplyStream(listOf(1, 106))
        for (piece in listOf("<end_of_turn>", "·40", "<end_of_turn>")) assertEquals("", stream.push(piece))
        assertEquals("", stream.visibleText)
        assertEquals(false, stream.endedByStop)
        val plain = ReplyStream(listOf(1, 106))
        plain.push("·40")
        plain.push("<eos>")
        assertEquals(true, plain.endedByStop)
        assertEquals("·40", plain.visibleText)
    }
}
