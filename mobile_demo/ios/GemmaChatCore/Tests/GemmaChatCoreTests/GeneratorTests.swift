import XCTest
@testable import GemmaChatCore

final class GeneratorTests: XCTestCase {
    /// Each scripted case of stops.json through the Swift loop: the same emitted, fed and pending
    /// tokens and the same reason as gemma3_export.generate.generate.
    func testStopsEndRepliesLikePython() throws {
        for c in try Vectors.cases(Vectors.load("stops.json")) {
            let prompt = try Vectors.ints(c["prompt"])
            let model = ScriptedModel(try Vectors.ints(c["sampled"]))
            let generator = Generator(model: model, maxContext: c["max_context"] as! Int, prefillChunks: [1, 2, 3, 4])
            var streamed: [Int] = []
            let reply = try generator.generate(prompt: prompt, maxNewTokens: c["max_new_tokens"] as! Int,
                                               stopIds: Set(try Vectors.ints(c["stop_ids"])), sampler: TokenSampler(),
                                               onToken: { streamed.append($0) })
            XCTAssertEqual(reply.tokens, try Vectors.ints(c["emitted"]))
            XCTAssertEqual(streamed, reply.tokens)
            XCTAssertEqual(model.decoded(after: prompt.count), try Vectors.ints(c["fed"]))
            XCTAssertEqual(reply.pending, c["pending"] as? Int)
            let expected: EndReason
            switch c["reason"] as! String {
            case "stop": expected = .stop(c["stop_token"] as! Int)
            case "length": expected = .length
            default: expected = .context
            }
            XCTAssertEqual(reply.reason, expected)
        }
    }

    func testGreedyContinuationsReplayThroughTheLoop() throws {
        let greedy = try Vectors.load("greedy.json")
        for c in try Vectors.cases(greedy) {
            let continuation = try Vectors.ints(c["continuation"])
            let prompt = try Vectors.ints(c["prompt_ids"])
            let chunk = greedy["chunk"] as! Int
            let prefillCalls = ChunkPlan.plan(prompt.count, accepted: Array(1...chunk)).count
            // The model answers each prefill chunk (only the last one counts), then every decode step.
            let model = ScriptedModel(Array(repeating: 0, count: prefillCalls - 1) + continuation + [1])
            let generator = Generator(model: model, maxContext: greedy["max_context"] as! Int, prefillChunks: Array(1...chunk))
            let reply = try generator.generate(prompt: prompt, maxNewTokens: greedy["max_new_tokens"] as! Int,
                                               stopIds: Set(try Vectors.ints(greedy["stop_ids"])), sampler: TokenSampler())
            XCTAssertEqual(reply.tokens, continuation)
        }
    }

    func testStopCancelsAfterTheCurrentToken() throws {
        let model = ScriptedModel([40, 41, 42, 43])
        let generator = Generator(model: model, maxContext: 64, prefillChunks: [1])
        var seen = 0
        let reply = try generator.generate(prompt: [2], maxNewTokens: 10, stopIds: [1, 106], sampler: TokenSampler(),
                                           shouldStop: { seen >= 2 }, onToken: { _ in seen += 1 })
        XCTAssertEqual(reply.tokens, [40, 41])
        XCTAssertEqual(reply.reason, .cancelled)
        XCTAssertEqual(reply.pending, 41)
    }
}
