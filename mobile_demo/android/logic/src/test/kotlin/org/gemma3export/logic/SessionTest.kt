package org.gemma3export.logic

import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Test

class SessionTest {
    private val chat = Vectors.load("chat.json")

    private fun case(prefix: String) = Vectors.cases(chat).first { it["name"].toString().startsWith(prefix) }

    private fun turn(prefix: String) = Vectors.cases(chat, "turns").first { it["name"].toString().startsWith(prefix) }

    @Test
    fun aStoppedReplyLetsTheNextTurnReuseTheCache() {
        val session = ChatSession()
        val first = session.request("Hello there!")
        assertTrue(first.resetFirst)
        assertEquals(case("one user turn")["text"], first.prompt)
        session.finish("Hi!", endedByStop = true)
        val next = session.request("And then?")
        assertFalse(next.resetFirst)
        assertEquals(turn("next turn after a reply ended by a stop id")["text"], next.prompt)
    }

    @Test
    fun aCutReplyMakesTheNextTurnResendTheConversation() {
        val multi = case("multi-turn")
        val session = ChatSession()
        session.request("Hi")
        session.finish("Hello! How can I help?", endedByStop = false)
        val next = session.request("Tell me about bread.")
        assertTrue(next.resetFirst)
        assertEquals(multi["text"], next.prompt)
        assertEquals(1, session.turns)
    }

    @Test
    fun aSystemPromptOpensTheConversation() {
        val t = turn("first turn with a system prompt")
        val session = ChatSession(system = t["system"] as String)
        assertEquals(t["text"], session.request(t["user"] as String).prompt)
    }
}
