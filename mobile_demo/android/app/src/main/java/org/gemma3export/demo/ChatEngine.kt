package org.gemma3export.demo

import android.os.Handler
import android.os.HandlerThread
import org.gemma3export.logic.BundleError
import org.gemma3export.logic.BundleManifest
import org.gemma3export.logic.ChatSession
import org.gemma3export.logic.GemmaChat
import org.gemma3export.logic.JsonError
import org.gemma3export.logic.ReplyStream
import org.gemma3export.logic.RunStats
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule
import java.io.File

/**
 * One ExecuTorch bundle behind ExecuTorch's stock LLM runner (LlmModule). Everything runs on one worker
 * thread; [stop] may be called from any thread while a reply streams. Listener calls come from the
 * worker thread.
 */
class ChatEngine(private val bundleDir: File, private val listener: Listener) : LlmCallback {
    interface Listener {
        fun onLoaded(manifest: BundleManifest, seconds: Double)
        fun onText(text: String)
        fun onReplyDone(stats: RunStats?, contextUsed: Int, maxContext: Int, endedByStop: Boolean)
        fun onError(message: String)
    }

    private val thread = HandlerThread("gemma3-runner").apply { start() }
    private val handler = Handler(thread.looper)
    private var module: LlmModule? = null
    private var manifest: BundleManifest? = null
    private var session = ChatSession()
    private var stream: ReplyStream? = null
    private var stats: RunStats? = null
    private var contextUsed = 0

    /** Read and check the manifest, then load model.pte with the bundle's tokenizer.json. */
    fun load(temperature: Float) = handler.post {
        try {
            val started = System.nanoTime()
            module?.resetNative()
            module = null
            val manifestFile = File(bundleDir, "manifest.json")
            if (!manifestFile.isFile) throw BundleError("No bundle at ${bundleDir.absolutePath}: push one there (see mobile_demo/README.md).")
            val m = BundleManifest.parse(manifestFile.readText(Charsets.UTF_8))
            m.requireTarget("executorch")
            m.checkStockRunner()
            GemmaChat.checkTemplate(m.chatTemplate)
            val pte = bundleFile(m.artifact)
            val tokenizer = bundleFile(m.runnerTokenizer())
            val llm = LlmModule(pte.absolutePath, tokenizer.absolutePath, temperature)
            val status = llm.load()
            if (status != 0) throw BundleError("ExecuTorch could not load ${m.artifact} (error $status).")
            module = llm
            manifest = m
            session = ChatSession()
            contextUsed = 0
            listener.onLoaded(m, (System.nanoTime() - started) / 1e9)
        } catch (e: BundleError) {
            listener.onError(e.message ?: "The bundle cannot be used.")
        } catch (e: RuntimeException) { // ExecuTorch reports unreadable files and load failures this way
            listener.onError("ExecuTorch could not load the bundle: ${e.message}")
        }
    }

    /** Stream the model's answer to [text]; only the tokens new since the last turn are prefilled. */
    fun send(text: String) = handler.post {
        val llm = module
        val m = manifest
        if (llm == null || m == null) {
            listener.onError("Load a bundle first.")
            return@post
        }
        try {
            if (contextUsed >= m.maxContext - 1) throw BundleError("The conversation no longer fits the context; tap Reset to start over.")
            val request = session.request(text)
            if (request.resetFirst) {
                llm.resetContext()
                contextUsed = 0
            }
            val reply = ReplyStream(m.stopIds)
            stream = reply
            stats = null
            val status = llm.generate(request.prompt, m.maxContext, this, false)
            if (status != 0) {
                llm.resetContext()
                session.reset()
                contextUsed = 0
                throw BundleError("Generation failed (ExecuTorch error $status); the conversation was reset.")
            }
            session.finish(reply.visibleText, reply.endedByStop)
            val s = stats
            // The runner's position moves by the prompt and the tokens it fed back (generated_tokens:
            // every streamed token but the last, which is sampled and never fed).
            if (s != null) contextUsed += s.promptTokens + s.generatedTokens
            listener.onReplyDone(s, contextUsed, m.maxContext, reply.endedByStop)
        } catch (e: BundleError) {
            listener.onError(e.message ?: "The message cannot be sent.")
        } catch (e: RuntimeException) {
            llm.resetContext()
            session.reset()
            contextUsed = 0
            listener.onError("Generation failed (${e.message}); the conversation was reset.")
        }
    }

    fun stop() {
        module?.stop()
    }

    /** Forget the conversation: the next message starts at position 0. */
    fun reset() = handler.post {
        module?.resetContext()
        session.reset()
        contextUsed = 0
    }

    fun close() {
        handler.post {
            module?.resetNative()
            module = null
        }
        thread.quitSafely()
    }

    override fun onResult(result: String) {
        val shown = stream?.push(result) ?: return
        if (shown.isNotEmpty()) listener.onText(shown)
    }

    override fun onStats(stats: String) {
        this.stats = try {
            RunStats.parse(stats)
        } catch (e: JsonError) {
            null
        }
    }

    private fun bundleFile(relative: String): File {
        val f = File(bundleDir, relative)
        if (!f.isFile) throw BundleError("The bundle is incomplete: $relative is missing.")
        return f
    }
}
