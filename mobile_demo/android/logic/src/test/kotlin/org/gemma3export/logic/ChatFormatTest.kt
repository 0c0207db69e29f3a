package org.gemma3export.logic

import org.junit.Assert.assertEquals
import org.junit.Assert.fail
import org.junit.Test

class ChatFormatTest {
    private val chat = Vectors.load("chat.json")
    private val tokens = Vectors.load("tokens.json")

    /** Control ids from the tokenizer's special ids; text ids from the vectors' own parts. */
    private val controlIds: Map<String, Int> =
        (tokens["pieces"] as Map<*, *>).entries.associate { (id, piece) -> piece as String to (id as String).toInt() }
    private val greedy = Vectors.load("greedy.json")
    private val textIds: Map<String, List<Int>> = (Vectors.cases(chat) + Vectors.cases(chat, "turns") + Vectors.cases(greedy))
        .flatMap { c -> (c["parts"] as List<*>).map { it as Map<*, *> } }
        .filter { it["control"] == false }
        .associate { it["text"] as String to Vectors.ints(it["ids"]) }

    private fun ids(parts: List<GemmaChat.Part>) =
        GemmaChat.assembleIds(parts, { controlIds.getValue(it) }, { textIds.getValue(it) })

    @Test
    fun rendersEveryConversationLikePython() {
        for (case in Vectors.cases(chat)) {
            val parts = GemmaChat.parts(Vectors.messages(case["messages"]), case["add_generation_prompt"] as Boolean)
            assertEquals(case["name"].toString(), Vectors.parts(case["parts"]), parts)
            assertEquals(case["text"], GemmaChat.render(parts))
            assertEquals(Vectors.ints(case["ids"]), ids(parts))
        }
    }

    @Test
    fun refusesMalformedConversations() {
        for (case in Vectors.cases(chat, "refused")) {
            try {
                GemmaChat.parts(Vectors.messages(case["messages"]))
                fail("accepted: ${case["why"]}")
            } catch (e: BundleError) {
                // expected
            }
        }
    }

    @Test
    fun nextTurnsFeedOnlyTheNewTokens() {
        for (case in Vectors.cases(chat, "turns")) {
            val user = case["user"] as String
            val parts = if (case["first_turn"] == true) {
                val system = case["system"] as String?
                GemmaChat.parts((if (system != null) listOf(GemmaChat.Message("system", system)) else emptyList()) + GemmaChat.Message("user", user))
            } else {
                GemmaChat.nextTurnParts(user)
            }
            assertEquals(Vectors.parts(case["parts"]), parts)
            assertEquals(case["text"], GemmaChat.render(parts))
            val pending = (case["pending"] as Long?)?.toInt()
            assertEquals(Vectors.ints(case["ids"]), listOfNotNull(pending) + ids(parts))
        }
    }

    @Test
    fun greedyPromptsAssembleToTheirIds() {
        for (case in Vectors.cases(greedy)) {
            val prompt = case["prompt"] as String
            val parts = if (case["chat"] == true) GemmaChat.parts(listOf(GemmaChat.Message("user", prompt)))
            else listOf(GemmaChat.Part(true, GemmaChat.BOS), GemmaChat.Part(false, prompt))
            assertEquals(Vectors.parts(case["parts"]), parts)
            assertEquals(Vectors.ints(case["prompt_ids"]), ids(parts))
        }
    }

    @Test
    fun specialStringsInUserTextAreRefused() {
        val typed = Vectors.cases(chat).first { it["name"].toString().startsWith("control strings") }
        val text = Vectors.messages(typed["messages"]).first().content
        try {
            GemmaChat.checkUserText(text)
            fail("accepted $text")
        } catch (e: BundleError) {
            // expected: the runner's tokenizer would parse it as a control token
        }
        GemmaChat.checkUserText("an ordinary <b>message</b>")
    }

    @Test
    fun theTemplateHashIsTheVectorsOne() {
        assertEquals(chat["template_sha256"], GemmaChat.TEMPLATE_SHA256)
    }
}
