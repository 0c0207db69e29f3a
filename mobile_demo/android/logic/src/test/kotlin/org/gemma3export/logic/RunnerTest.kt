package org.gemma3export.logic

import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Test

class RunnerTest {
    /** The stock runner prefills chunks of get_max_seq_len, then the rest in one call: the plan the
     * vectors give for prefill_chunks 1..C; Core ML's [C, 1] is not a stock-runner bundle. */
    @Test
    fun stockRunnerPlansAreTheVectorPlans() {
        for (case in Vectors.cases(Vectors.load("chunks.json"))) {
            val n = (case["n"] as Long).toInt()
            val chunk = (case["chunk"] as Long).toInt()
            val accepted = Vectors.ints(case["prefill_chunks"])
            if (BundleManifest.stockRunnerAccepts(accepted, chunk)) {
                val stock = List(n / chunk) { chunk } + (if (n % chunk > 0) listOf(n % chunk) else emptyList())
                assertEquals(Vectors.ints(case["plan"]), stock)
            } else {
                assertFalse(chunk == 1)
                assertEquals(listOf(chunk, 1), accepted)
            }
        }
    }

    @Test
    fun statsGiveDecodeSpeed() {
        val s = RunStats.parse("""{"prompt_tokens":12,"generated_tokens":40,"model_load_start_ms":0,"model_load_end_ms":900,
            "inference_start_ms":1000,"prompt_eval_end_ms":1200,"first_token_ms":1200,"inference_end_ms":3200,
            "aggregate_sampling_time_ms":5,"SCALING_FACTOR_UNITS_PER_SECOND":1000}""")
        assertEquals(12, s.promptTokens)
        assertEquals(20.0, s.decodeTokensPerSecond, 1e-9)
        assertTrue(RunStats(1, 0, 5, 5).decodeTokensPerSecond == 0.0)
    }
}
