package org.gemma3export.logic

/** A bundle the app cannot use; the message is one sentence for the user. */
class BundleError(message: String) : Exception(message)

/**
 * The fields of a gemma3-export manifest.json that the app reads, checked the way
 * gemma3_export/data/manifest.schema.json and contract.check_manifest check them (the shared
 * vectors in mobile_demo/shared/test_vectors/manifests.json hold the cases). Nothing about a
 * bundle is ever inferred from its file names.
 */
class BundleManifest private constructor(
    val formatVersion: Int,
    val target: String,
    val artifact: String,
    val tokenizer: String,
    val hfTokenizer: List<String>,
    val bosId: Int,
    val stopIds: List<Int>,
    val maxContext: Int,
    val prefillChunk: Int,
    val prefillChunks: List<Int>,
    val chatTemplate: String,
    val vocabSize: Int,
    /** ExecuTorch only: the constant methods the stock LLM runner reads from the .pte. */
    val runnerMetadata: Map<String, Any?>?
) {
    /** Refuse a bundle exported for another runtime. */
    fun requireTarget(expected: String) {
        if (target != expected) {
            throw BundleError("This bundle is for $target; this app runs $expected bundles (export with --target $expected).")
        }
    }

    /**
     * Check what ExecuTorch's stock runner (LlmModule) will do against the manifest: it stops on the
     * .pte's get_eos_ids, prefills in chunks of get_max_seq_len and then the rest in one smaller call.
     */
    fun checkStockRunner() {
        val meta = runnerMetadata
            ?: throw BundleError("The manifest has no target_info.metadata, so the .pte's runner settings cannot be checked.")
        val eos = (meta["get_eos_ids"] as? List<*>)?.map { (it as? Long)?.toInt() }
        if (eos == null || eos.toSet() != stopIds.toSet()) {
            throw BundleError("The .pte stops on $eos but the manifest's stop ids are $stopIds; re-export the bundle.")
        }
        if ((meta["get_bos_id"] as? Long)?.toInt() != bosId) {
            throw BundleError("The .pte's BOS id differs from the manifest's bos_id $bosId; re-export the bundle.")
        }
        val seqLen = (meta["get_max_seq_len"] as? Long)?.toInt()
        if (seqLen != prefillChunk || !stockRunnerAccepts(prefillChunks, prefillChunk)) {
            throw BundleError("The stock runner prefills chunks of 1 to $seqLen tokens, but the bundle accepts $prefillChunks.")
        }
    }

    /**
     * The tokenizer file to hand to ExecuTorch's runner: the bundle's tokenizer.json. Its SentencePiece
     * tokenizer.model cannot be used for chat: SentencePiece never parses <start_of_turn> or <bos>
     * written in the prompt text, while the Hugging Face tokenizer matches them as special tokens.
     */
    fun runnerTokenizer(): String = hfTokenizer.firstOrNull { it.substringAfterLast('/') == "tokenizer.json" }
        ?: throw BundleError(
            "This bundle has no tokenizer.json, and ExecuTorch's runner cannot read Gemma's turn markers " +
                "from tokenizer.model; re-export it with a gemma3-export that writes tokenizer.json."
        )

    companion object {
        /** The newest manifest format this app reads. */
        const val SUPPORTED_FORMAT = 1
        val TARGETS = listOf("onnx", "executorch", "coreml")

        fun parse(text: String): BundleManifest {
            val json = try {
                Json.parse(text)
            } catch (e: JsonError) {
                throw BundleError("manifest.json is not valid JSON (${e.message?.removeSuffix(".")}).")
            }
            return from(json)
        }

        fun from(json: Any?): BundleManifest {
            val m = json as? Map<*, *> ?: throw BundleError("manifest.json is not a JSON object.")
            val version = m["format_version"] as? Long
                ?: throw BundleError("manifest.json has no integer format_version.")
            if (version > SUPPORTED_FORMAT) {
                throw BundleError("This bundle is format $version, newer than the $SUPPORTED_FORMAT this app reads; update the app.")
            }
            if (version < 1) throw BundleError("manifest.json has an invalid format_version $version.")
            val target = string(m, "target")
            if (target !in TARGETS) throw BundleError("manifest.json names an unknown target '$target'.")
            val config = m["config"] as? Map<*, *> ?: throw BundleError("manifest.json has no config object.")
            val vocab = positive(config, "vocab_size", "config.vocab_size")
            val bos = int(m, "bos_id", "bos_id", min = 0)
            val stops = intList(m, "stop_ids", min = 0)
            val maxContext = positive(m, "max_context")
            val chunk = positive(m, "prefill_chunk")
            val chunks = intList(m, "prefill_chunks", min = 1)
            if (stops.toSet().size != stops.size) throw BundleError("manifest.json repeats a stop id.")
            if (chunk !in chunks) throw BundleError("manifest.json's prefill_chunk $chunk is not one of its prefill_chunks $chunks.")
            if (chunks.reduce { a, b -> maxOf(a, b) } > maxContext) throw BundleError("manifest.json has a prefill chunk larger than its max_context $maxContext.")
            if (bos in stops) throw BundleError("manifest.json's bos_id $bos is also a stop id.")
            if ((stops + bos).reduce { a, b -> maxOf(a, b) } >= vocab) throw BundleError("manifest.json has a special token id outside the vocabulary of $vocab.")
            val hf = (m["hf_tokenizer"] as? List<*>)?.map { it as? String ?: throw BundleError("manifest.json's hf_tokenizer lists a non-string.") }
            val info = m["target_info"] as? Map<*, *>
            @Suppress("UNCHECKED_CAST")
            val metadata = info?.get("metadata") as? Map<String, Any?>
            return BundleManifest(
                formatVersion = version.toInt(),
                target = target,
                artifact = string(m, "artifact"),
                tokenizer = string(m, "tokenizer"),
                hfTokenizer = hf ?: emptyList(),
                bosId = bos,
                stopIds = stops,
                maxContext = maxContext,
                prefillChunk = chunk,
                prefillChunks = chunks,
                chatTemplate = string(m, "chat_template"),
                vocabSize = vocab,
                runnerMetadata = metadata
            )
        }

        /** True when every chunk plan of the stock runner (chunks of [maxSeqLen], then the rest) is accepted. */
        fun stockRunnerAccepts(prefillChunks: List<Int>, maxSeqLen: Int): Boolean =
            (1..maxSeqLen).all { it in prefillChunks }

        private fun string(m: Map<*, *>, key: String): String {
            val v = m[key] as? String
            if (v.isNullOrEmpty()) throw BundleError("manifest.json has no $key.")
            return v
        }

        private fun int(m: Map<*, *>, key: String, name: String, min: Int): Int {
            val v = m[key] ?: throw BundleError("manifest.json has no $name.")
            val n = v as? Long ?: throw BundleError("manifest.json's $name is not an integer.")
            if (n < min || n > Int.MAX_VALUE) throw BundleError("manifest.json's $name must be at least $min.")
            return n.toInt()
        }

        private fun positive(m: Map<*, *>, key: String, name: String = key) = int(m, key, name, min = 1)

        private fun intList(m: Map<*, *>, key: String, min: Int): List<Int> {
            val v = m[key] as? List<*> ?: throw BundleError("manifest.json has no $key list.")
            if (v.isEmpty()) throw BundleError("manifest.json's $key is empty.")
            return v.map {
                val n = it as? Long ?: throw BundleError("manifest.json's $key holds a non-integer.")
                if (n < min || n > Int.MAX_VALUE) throw BundleError("manifest.json's $key holds $n, below $min.")
                n.toInt()
            }
        }
    }
}
