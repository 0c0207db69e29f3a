package org.gemma3export.logic

/**
 * A multi-turn chat whose runner keeps the KV cache between turns (LlmModule.generate continues at its
 * position; resetContext() rewinds it). Each turn sends only the text that is new since the last one,
 * as gemma3_export.chat.Conversation does, except after a reply that did not end with a stop id: its
 * last token was sampled but never fed, and the runner cannot say which, so the next turn rewinds and
 * sends the whole conversation again.
 */
class ChatSession(private val system: String? = null) {
    /** The prompt text for one turn, and whether the runner's context must be reset before it. */
    data class Request(val resetFirst: Boolean, val prompt: String)

    private val history = mutableListOf<GemmaChat.Message>()
    private var cacheHoldsHistory = true
    private var pendingUser: String? = null

    val turns: Int get() = history.count { it.role == "user" }

    fun request(userText: String): Request {
        check(pendingUser == null) { "finish() the previous turn first" }
        GemmaChat.checkUserText(userText)
        system?.let { GemmaChat.checkUserText(it) }
        val user = GemmaChat.Message("user", userText)
        val request = when {
            history.isEmpty() -> Request(true, GemmaChat.render(GemmaChat.parts(opening() + user)))
            cacheHoldsHistory -> Request(false, GemmaChat.render(GemmaChat.nextTurnParts(userText)))
            else -> Request(true, GemmaChat.render(GemmaChat.parts(opening() + history + user)))
        }
        pendingUser = userText
        return request
    }

    /** Record the model's reply to the last request; [endedByStop] from [ReplyStream]. */
    fun finish(reply: String, endedByStop: Boolean) {
        val user = pendingUser ?: throw IllegalStateException("no turn to finish")
        history += GemmaChat.Message("user", user)
        history += GemmaChat.Message("model", reply)
        cacheHoldsHistory = endedByStop
        pendingUser = null
    }

    /** Forget the conversation (call LlmModule.resetContext() with it). */
    fun reset() {
        history.clear()
        cacheHoldsHistory = true
        pendingUser = null
    }

    private fun opening(): List<GemmaChat.Message> =
        if (system != null) listOf(GemmaChat.Message("system", system)) else emptyList()
}
