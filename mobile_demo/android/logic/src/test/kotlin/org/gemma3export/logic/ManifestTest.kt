package org.gemma3export.logic

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class ManifestTest {
    private val vectors = Vectors.load("manifests.json")

    @Suppress("UNCHECKED_CAST")
    private val valid = vectors["valid"] as List<Map<String, Any?>>

    @Test
    fun readsTheFormatThePythonSideWrites() {
        assertEquals((vectors["supported_format_version"] as Long).toInt(), BundleManifest.SUPPORTED_FORMAT)
        assertEquals(listOf("onnx", "executorch", "coreml"), valid.map { BundleManifest.from(it).target })
    }

    @Test
    fun acceptsEveryValidManifest() {
        for (json in valid) {
            val m = BundleManifest.from(json)
            assertEquals(2, m.bosId)
            assertEquals(listOf(1, 106), m.stopIds)
            assertTrue(m.prefillChunk in m.prefillChunks)
            GemmaChat.checkTemplate(m.chatTemplate)
        }
    }

    @Test
    fun refusesEveryBrokenManifest() {
        for (case in Vectors.cases(vectors, "refused")) {
            val json = patched(case)
            try {
                BundleManifest.from(json)
                fail("accepted a manifest with ${case["why"]}")
            } catch (e: BundleError) {
                assertTrue(e.message!!.endsWith("."))
            }
        }
    }

    @Test
    fun aFutureFormatIsRefusedByName() {
        val future = Vectors.cases(vectors, "refused").first { it["why"].toString().startsWith("written by a newer") }
        try {
            BundleManifest.from(patched(future))
            fail("accepted format 2")
        } catch (e: BundleError) {
            assertEquals("This bundle is format 2, newer than the 1 this app reads; update the app.", e.message)
        }
    }

    @Test
    fun theExecuTorchBundleMatchesTheStockRunner() {
        val et = BundleManifest.from(valid[1])
        et.requireTarget("executorch")
        et.checkStockRunner()
        val coreml = BundleManifest.from(valid[2])
        assertEquals("tokenizer.json", coreml.runnerTokenizer())
        expectRefusal { coreml.requireTarget("executorch") }
        expectRefusal { coreml.checkStockRunner() }
        assertEquals("tokenizer.json", et.runnerTokenizer())
        // A bundle from before every export carried tokenizer.json: refused for chat, in one sentence.
        val old = LinkedHashMap(valid[1])
        old.remove("hf_tokenizer")
        expectRefusal { BundleManifest.from(old).runnerTokenizer() }
    }

    @Test
    fun stopIdsMustMatchThePte() {
        val json = LinkedHashMap(valid[1])
        json["stop_ids"] = listOf(1L)
        expectRefusal { BundleManifest.from(json).checkStockRunner() }
    }

    @Test
    fun anotherTemplateIsRefused() {
        expectRefusal { GemmaChat.checkTemplate(BundleManifest.from(valid[0]).chatTemplate + " ") }
    }

    private fun expectRefusal(block: () -> Unit) {
        try {
            block()
            fail("no BundleError")
        } catch (e: BundleError) {
            // expected
        }
    }

    /** valid[base] with `set` fields replaced and `remove` paths deleted (contract.refused_manifest). */
    @Suppress("UNCHECKED_CAST")
    private fun patched(case: Map<String, Any?>): Map<String, Any?> {
        val base = deepCopy(valid[(case["base"] as Long).toInt()]) as MutableMap<String, Any?>
        base.putAll(case["set"] as Map<String, Any?>)
        for (path in case["remove"] as List<String>) {
            val keys = path.split("/")
            var node = base
            for (key in keys.dropLast(1)) node = node[key] as MutableMap<String, Any?>
            node.remove(keys.last())
        }
        return base
    }

    private fun deepCopy(v: Any?): Any? = when (v) {
        is Map<*, *> -> LinkedHashMap<String, Any?>().also { out -> v.forEach { (k, x) -> out[k as String] = deepCopy(x) } }
        is List<*> -> v.map { deepCopy(it) }
        else -> v
    }
}
