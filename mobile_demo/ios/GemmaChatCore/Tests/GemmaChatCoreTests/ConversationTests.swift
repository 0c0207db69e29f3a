import XCTest
@testable import GemmaChatCore

/// The second turn feeds only its new tokens: exactly the ids chat.json's `turns` give (the same as
/// gemma3_export.chat.Conversation.next_ids).
final class ConversationTests: XCTestCase {
    private func turn(_ prefix: String) throws -> [String: Any] {
        try XCTUnwrap(Vectors.cases(Vectors.load("chat.json"), "turns").first { ($0["name"] as! String).hasPrefix(prefix) })
    }

    private func conversation(script: [Int]) throws -> (Conversation, ScriptedModel) {
        let model = ScriptedModel(script)
        let generator = Generator(model: model, maxContext: 128, prefillChunks: [1, 2, 3, 4])
        return (Conversation(generator: generator, tokenizer: try VectorTokenizer(), system: "Be brief."), model)
    }

    func testFirstTurnIsTheWholeChatPrompt() throws {
        let first = try turn("first turn with a system prompt")
        let (conv, _) = try conversation(script: [])
        XCTAssertEqual(try conv.nextIds(first["user"] as! String), try Vectors.ints(first["ids"]))
    }

    func testAfterAStoppedReplyOnlyTheNextTurnIsFed() throws {
        let first = try turn("first turn with a system prompt")
        let next = try turn("next turn after a reply ended by a stop id")
        let promptCalls = ChunkPlan.plan(try Vectors.ints(first["ids"]).count, accepted: [1, 2, 3, 4]).count
        let (conv, _) = try conversation(script: Array(repeating: 0, count: promptCalls - 1) + [50, 51, 106])
        let reply = try conv.say(first["user"] as! String, maxNewTokens: 10, stopIds: [1, 106], sampler: TokenSampler())
        XCTAssertEqual(reply.tokens, [50, 51])
        XCTAssertNil(conv.pending)
        XCTAssertEqual(conv.fed.suffix(2), [50, 51])
        XCTAssertEqual(try conv.nextIds(next["user"] as! String), try Vectors.ints(next["ids"]))
    }

    func testAfterACutReplyThePendingTokenLeads() throws {
        let first = try turn("first turn with a system prompt")
        let next = try turn("next turn after a reply cut by max_new_tokens")
        let promptLength = try Vectors.ints(first["ids"]).count
        let promptCalls = ChunkPlan.plan(promptLength, accepted: [1, 2, 3, 4]).count
        let (conv, model) = try conversation(script: Array(repeating: 0, count: promptCalls - 1) + [50, 51, 52, 53])
        _ = try conv.say(first["user"] as! String, maxNewTokens: 3, stopIds: [1, 106], sampler: TokenSampler())
        XCTAssertEqual(conv.pending, next["pending"] as? Int)
        XCTAssertEqual(model.decoded(after: promptLength), [50, 51])
        XCTAssertEqual(try conv.nextIds(next["user"] as! String), try Vectors.ints(next["ids"]))
    }
}
