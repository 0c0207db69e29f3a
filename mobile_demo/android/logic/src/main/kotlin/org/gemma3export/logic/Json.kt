package org.gemma3export.logic

/**
 * A small strict JSON reader (RFC 8259) for manifest.json and the shared test vectors, so the logic
 * module needs nothing beyond the Kotlin standard library. Objects become `Map<String, Any?>` (in file
 * order), arrays `List<Any?>`, integers `Long`, other numbers `Double`, plus `String`, `Boolean`, `null`.
 */
object Json {
    fun parse(text: String): Any? {
        val parser = Parser(text)
        parser.skipSpace()
        val value = parser.value()
        parser.skipSpace()
        if (!parser.atEnd()) throw parser.error("unexpected text after the value")
        return value
    }
}

class JsonError(message: String) : Exception(message)

private class Parser(private val s: String) {
    private var i = 0

    fun atEnd() = i >= s.length

    fun error(what: String) = JsonError("Invalid JSON at character $i: $what.")

    fun skipSpace() {
        while (i < s.length && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) i++
    }

    fun value(): Any? {
        if (atEnd()) throw error("unexpected end")
        return when (s[i]) {
            '{' -> obj()
            '[' -> array()
            '"' -> string()
            't' -> literal("true", true)
            'f' -> literal("false", false)
            'n' -> literal("null", null)
            else -> number()
        }
    }

    private fun literal(word: String, result: Any?): Any? {
        if (!s.startsWith(word, i)) throw error("expected $word")
        i += word.length
        return result
    }

    private fun obj(): Map<String, Any?> {
        val out = LinkedHashMap<String, Any?>()
        i++ // {
        skipSpace()
        if (i < s.length && s[i] == '}') { i++; return out }
        while (true) {
            skipSpace()
            if (atEnd() || s[i] != '"') throw error("expected a key")
            val key = string()
            skipSpace()
            expect(':')
            skipSpace()
            out[key] = value()
            skipSpace()
            if (atEnd()) throw error("unexpected end in an object")
            if (s[i] == ',') { i++; continue }
            expect('}')
            return out
        }
    }

    private fun array(): List<Any?> {
        val out = ArrayList<Any?>()
        i++ // [
        skipSpace()
        if (i < s.length && s[i] == ']') { i++; return out }
        while (true) {
            skipSpace()
            out.add(value())
            skipSpace()
            if (atEnd()) throw error("unexpected end in an array")
            if (s[i] == ',') { i++; continue }
            expect(']')
            return out
        }
    }

    private fun expect(c: Char) {
        if (atEnd() || s[i] != c) throw error("expected '$c'")
        i++
    }

    private fun string(): String {
        val out = StringBuilder()
        i++ // opening quote
        while (true) {
            if (atEnd()) throw error("unterminated string")
            val c = s[i++]
            when {
                c == '"' -> return out.toString()
                c == '\\' -> {
                    if (atEnd()) throw error("unterminated escape")
                    when (val e = s[i++]) {
                        '"' -> out.append('"')
                        '\\' -> out.append('\\')
                        '/' -> out.append('/')
                        'b' -> out.append('\b')
                        'f' -> out.append('\u000C')
                        'n' -> out.append('\n')
                        'r' -> out.append('\r')
                        't' -> out.append('\t')
                        'u' -> {
                            if (i + 4 > s.length) throw error("short unicode escape")
                            val code = s.substring(i, i + 4).toIntOrNull(16) ?: throw error("bad unicode escape")
                            out.append(code.toChar()) // surrogate pairs arrive as two escapes, in order
                            i += 4
                        }
                        else -> throw error("unknown escape '\\$e'")
                    }
                }
                c < ' ' -> throw error("control character in a string")
                else -> out.append(c)
            }
        }
    }

    private fun number(): Any {
        val start = i
        if (i < s.length && s[i] == '-') i++
        digits()
        var integral = true
        if (i < s.length && s[i] == '.') { integral = false; i++; digits() }
        if (i < s.length && (s[i] == 'e' || s[i] == 'E')) {
            integral = false
            i++
            if (i < s.length && (s[i] == '+' || s[i] == '-')) i++
            digits()
        }
        val text = s.substring(start, i)
        return if (integral) text.toLongOrNull() ?: throw error("integer out of range")
        else text.toDoubleOrNull() ?: throw error("bad number")
    }

    private fun digits() {
        val start = i
        while (i < s.length && s[i] in '0'..'9') i++
        if (i == start) throw error("expected a digit")
    }
}
