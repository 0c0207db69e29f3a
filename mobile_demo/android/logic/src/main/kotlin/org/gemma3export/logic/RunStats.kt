package org.gemma3export.logic

/**
 * The statistics ExecuTorch's runner reports after generate() (LlmCallback.onStats, a JSON string;
 * see extension/llm/runner/stats.h): token counts and millisecond timestamps.
 */
class RunStats(val promptTokens: Int, val generatedTokens: Int, private val promptEvalEndMs: Long, private val inferenceEndMs: Long) {
    /** Decode speed: generated tokens over the time after the prompt was read. */
    val decodeTokensPerSecond: Double
        get() = if (inferenceEndMs > promptEvalEndMs) generatedTokens * 1000.0 / (inferenceEndMs - promptEvalEndMs) else 0.0

    companion object {
        fun parse(json: String): RunStats {
            val m = Json.parse(json) as? Map<*, *> ?: throw JsonError("Runner stats are not a JSON object.")
            fun long(key: String) = (m[key] as? Number)?.toLong() ?: throw JsonError("Runner stats lack $key.")
            return RunStats(long("prompt_tokens").toInt(), long("generated_tokens").toInt(), long("prompt_eval_end_ms"), long("inference_end_ms"))
        }
    }
}
