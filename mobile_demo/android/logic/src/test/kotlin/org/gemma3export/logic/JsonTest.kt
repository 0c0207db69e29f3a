package org.gemma3export.logic

import org.junit.Assert.assertEquals
import org.junit.Assert.fail
import org.junit.Test

class JsonTest {
    @Test
    fun parsesValuesEscapesAndNumbers() {
        val v = Json.parse("""{"a": [1, -2, 3.5, 1e-06, true, false, null], "s": "caf\u00e9 \"q\" \\ \n \ud83d\ude00"}""") as Map<*, *>
        assertEquals(listOf(1L, -2L, 3.5, 1e-6, true, false, null), v["a"])
        assertEquals("café \"q\" \\ \n \uD83D\uDE00", v["s"])
    }

    @Test
    fun refusesMalformedText() {
        for (bad in listOf("{", "[1,]", "{\"a\" 1}", "01x", "\"open", "[1] 2", "{\"a\": tru}")) {
            try {
                Json.parse(bad)
                fail("accepted $bad")
            } catch (e: JsonError) {
                // expected
            }
        }
    }
}
