package org.gemma3export.logic

import java.security.MessageDigest

/**
 * Gemma 3's chat format, the same as gemma3_export.tokenizer.format_chat and the Jinja template
 * bundles carry: `<bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n`; a system
 * message is prepended to the first user turn followed by a blank line; the assistant is `model`.
 */
object GemmaChat {
    const val BOS = "<bos>"
    const val EOS = "<eos>"
    const val START_OF_TURN = "<start_of_turn>"
    const val END_OF_TURN = "<end_of_turn>"

    /** sha256 of the chat template gemma3-export writes into every manifest (chat.json: template_sha256). */
    const val TEMPLATE_SHA256 = "d2f96210400e38149e26e01918a408c3f2ad3d4bd87c44e8dcf8e1a611a98535"

    /** The pieces of Gemma's stop ids: what ExecuTorch's runner streams when it samples one. */
    val STOP_PIECES: Map<Int, String> = mapOf(1 to EOS, 106 to END_OF_TURN)

    /** Strings the on-device Hugging Face tokenizer reads as special tokens wherever they appear. */
    val SPECIAL_STRINGS = listOf(BOS, EOS, START_OF_TURN, END_OF_TURN, "<pad>", "<start_of_image>", "<end_of_image>")

    data class Message(val role: String, val content: String)

    /** A run of the prompt: a control token (inserted by id) or text (encoded). */
    data class Part(val control: Boolean, val text: String)

    /** Refuse a bundle whose chat template is not the Gemma 3 template this formatter implements. */
    fun checkTemplate(chatTemplate: String) {
        if (sha256(chatTemplate) != TEMPLATE_SHA256) {
            throw BundleError("This bundle's chat template is not Gemma 3's, and this app formats only Gemma 3 turns.")
        }
    }

    /** The parts of a whole conversation; mirrors gemma3_export.tokenizer._chat_parts. */
    fun parts(messages: List<Message>, addGenerationPrompt: Boolean = true): List<Part> {
        if (messages.isEmpty()) throw BundleError("The conversation has no messages.")
        var prefix = ""
        var first = 0
        if (messages[0].role == "system") {
            prefix = messages[0].content + "\n\n"
            first = 1
            if (messages.size == 1) throw BundleError("A system message must be followed by a user message.")
        }
        val out = mutableListOf(Part(true, BOS))
        for (index in first until messages.size) {
            val role = messages[index].role
            val userTurn = (index - first) % 2 == 0
            val ok = if (userTurn) role == "user" else role == "assistant" || role == "model"
            if (!ok) {
                throw BundleError(
                    "Message $index has role '$role', but a conversation is an optional system message " +
                        "followed by alternating user and assistant turns starting with user."
                )
            }
            val text = messages[index].content.trim()
            out += Part(true, START_OF_TURN)
            out += Part(false, (if (userTurn) "user" else "model") + "\n" + (if (index == first) prefix else "") + text)
            out += Part(true, END_OF_TURN)
            out += Part(false, "\n")
        }
        if (addGenerationPrompt) {
            out += Part(true, START_OF_TURN)
            out += Part(false, "model\n")
        }
        return out
    }

    /**
     * What a cache that already holds the conversation needs before the model answers [userText]:
     * close the model's turn (its stop token was sampled, not fed), then the user's turn.
     * Mirrors gemma3_export.chat.Conversation.next_ids.
     */
    fun nextTurnParts(userText: String): List<Part> =
        listOf(Part(true, END_OF_TURN), Part(false, "\n")) +
            parts(listOf(Message("user", userText))).drop(1) // no second <bos>

    fun render(parts: List<Part>): String = parts.joinToString("") { it.text }

    /** Token ids of [parts]: control tokens by id, text through [encode] (the tokenizer, no BOS). */
    fun assembleIds(parts: List<Part>, controlId: (String) -> Int, encode: (String) -> List<Int>): List<Int> =
        parts.flatMap { if (it.control) listOf(controlId(it.text)) else encode(it.text) }

    /**
     * The on-device runner tokenizes prompt text, so a special string typed by the user would become a
     * control token there (the Python reference encodes it as text): refuse such messages instead.
     */
    fun checkUserText(text: String) {
        val found = SPECIAL_STRINGS.firstOrNull { text.contains(it) }
        if (found != null) {
            throw BundleError("The message contains $found, which the on-device tokenizer would read as a control token; remove it.")
        }
    }

    private fun sha256(text: String): String =
        MessageDigest.getInstance("SHA-256").digest(text.toByteArray(Charsets.UTF_8))
            .joinToString("") { String.format("%02x", it) }
}
