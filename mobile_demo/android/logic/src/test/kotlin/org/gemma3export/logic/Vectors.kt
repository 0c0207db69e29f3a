package org.gemma3export.logic

import java.io.File

/**
 * The shared test vectors (mobile_demo/shared/test_vectors, written by the Python side). The folder
 * comes from the `vectors` system property (Gradle and the pytest runner set it), else the default
 * relative to this module.
 */
object Vectors {
    private val folder: File by lazy {
        val dir = File(System.getProperty("vectors") ?: "../../shared/test_vectors")
        require(File(dir, "manifests.json").isFile) { "no test vectors in ${dir.absolutePath}" }
        dir
    }

    @Suppress("UNCHECKED_CAST")
    fun load(name: String): Map<String, Any?> = Json.parse(File(folder, name).readText(Charsets.UTF_8)) as Map<String, Any?>

    @Suppress("UNCHECKED_CAST")
    fun cases(file: Map<String, Any?>, key: String = "cases"): List<Map<String, Any?>> = file[key] as List<Map<String, Any?>>

    fun ints(value: Any?): List<Int> = (value as List<*>).map { (it as Long).toInt() }

    fun messages(value: Any?): List<GemmaChat.Message> =
        (value as List<*>).map { val m = it as Map<*, *>; GemmaChat.Message(m["role"] as String, m["content"] as String) }

    fun parts(value: Any?): List<GemmaChat.Part> =
        (value as List<*>).map { val p = it as Map<*, *>; GemmaChat.Part(p["control"] as Boolean, p["text"] as String) }
}
