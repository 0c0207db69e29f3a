package org.gemma3export.demo

import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.ScrollView
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import org.gemma3export.logic.BundleManifest
import org.gemma3export.logic.RunStats
import java.io.File
import java.util.Locale

/**
 * A chat screen over the bundle in the app's external files folder
 * (/sdcard/Android/data/org.gemma3export.demo/files/bundle, where `adb push` can put it).
 */
class MainActivity : AppCompatActivity(), ChatEngine.Listener {
    private lateinit var engine: ChatEngine
    private lateinit var status: TextView
    private lateinit var transcript: TextView
    private lateinit var stats: TextView
    private lateinit var scroll: ScrollView
    private lateinit var input: EditText
    private lateinit var temperature: EditText

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        status = findViewById(R.id.status)
        transcript = findViewById(R.id.transcript)
        stats = findViewById(R.id.stats)
        scroll = findViewById(R.id.scroll)
        input = findViewById(R.id.input)
        temperature = findViewById(R.id.temperature)

        val bundleDir = File(getExternalFilesDir(null), "bundle")
        engine = ChatEngine(bundleDir, this)
        status.text = "Loading ${bundleDir.absolutePath} …"
        engine.load(readTemperature())

        findViewById<Button>(R.id.load).setOnClickListener {
            status.text = "Loading ${bundleDir.absolutePath} …"
            transcript.text = ""
            engine.load(readTemperature())
        }
        findViewById<Button>(R.id.send).setOnClickListener {
            val text = input.text.toString().trim()
            if (text.isNotEmpty()) {
                input.setText("")
                append("\n\nYou: $text\nGemma: ")
                engine.send(text)
            }
        }
        findViewById<Button>(R.id.stop).setOnClickListener { engine.stop() }
        findViewById<Button>(R.id.reset).setOnClickListener {
            engine.reset()
            transcript.text = ""
            stats.text = ""
        }
    }

    override fun onDestroy() {
        engine.stop()
        engine.close()
        super.onDestroy()
    }

    private fun readTemperature(): Float = temperature.text.toString().toFloatOrNull()?.coerceAtLeast(0f) ?: 0f

    private fun append(text: String) {
        transcript.append(text)
        scroll.post { scroll.fullScroll(ScrollView.FOCUS_DOWN) }
    }

    override fun onLoaded(manifest: BundleManifest, seconds: Double) = runOnUiThread {
        status.text = String.format(
            Locale.US, "Loaded %s in %.1f s: context %d, prefill chunk %d, stop ids %s",
            manifest.artifact, seconds, manifest.maxContext, manifest.prefillChunk, manifest.stopIds
        )
    }

    override fun onText(text: String) = runOnUiThread { append(text) }

    override fun onReplyDone(stats: RunStats?, contextUsed: Int, maxContext: Int, endedByStop: Boolean) = runOnUiThread {
        val speed = if (stats != null) String.format(Locale.US, "%.1f tokens/s, %d tokens", stats.decodeTokensPerSecond, stats.generatedTokens) else "no stats"
        val end = if (endedByStop) "" else " (cut: the next turn re-sends the conversation)"
        this.stats.text = "$speed · context $contextUsed/$maxContext$end"
    }

    override fun onError(message: String) = runOnUiThread { status.text = message }
}
