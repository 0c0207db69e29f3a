import XCTest
@testable import GemmaChatCore

final class ChatTests: XCTestCase {
    private var chat: [String: Any] = [:]
    private var tokenizer: VectorTokenizer!

    override func setUpWithError() throws {
        chat = try Vectors.load("chat.json")
        tokenizer = try VectorTokenizer()
    }

    private func ids(_ parts: [GemmaChat.Part]) throws -> [Int] {
        try GemmaChat.assembleIds(parts, controlId: { try tokenizer.controlId($0) }, encode: { tokenizer.encode($0) })
    }

    func testRendersEveryConversationLikePython() throws {
        for c in try Vectors.cases(chat) {
            let parts = try GemmaChat.parts(Vectors.messages(c["messages"]), addGenerationPrompt: c["add_generation_prompt"] as! Bool)
            XCTAssertEqual(parts, try Vectors.parts(c["parts"]), "\(c["name"]!)")
            XCTAssertEqual(GemmaChat.render(parts), c["text"] as? String)
            XCTAssertEqual(try ids(parts), try Vectors.ints(c["ids"]))
        }
    }

    func testRefusesMalformedConversations() throws {
        for c in try Vectors.cases(chat, "refused") {
            XCTAssertThrowsError(try GemmaChat.parts(Vectors.messages(c["messages"])), "\(c["why"]!)")
        }
    }

    func testNextTurnsFeedOnlyTheNewTokens() throws {
        for c in try Vectors.cases(chat, "turns") {
            let user = c["user"] as! String
            let parts: [GemmaChat.Part]
            if c["first_turn"] as! Bool {
                let opening = (c["system"] as? String).map { [GemmaChat.Message(role: "system", content: $0)] } ?? []
                parts = try GemmaChat.parts(opening + [GemmaChat.Message(role: "user", content: user)])
            } else {
                parts = try GemmaChat.nextTurnParts(user)
            }
            XCTAssertEqual(parts, try Vectors.parts(c["parts"]))
            XCTAssertEqual(GemmaChat.render(parts), c["text"] as? String)
            let pending = (c["pending"] as? Int).map { [$0] } ?? []
            let assembled = try ids(parts)
            XCTAssertEqual(pending + assembled, try Vectors.ints(c["ids"]))
        }
    }

    func testGreedyPromptsAssembleToTheirIds() throws {
        for c in try Vectors.cases(Vectors.load("greedy.json")) {
            let prompt = c["prompt"] as! String
            let parts: [GemmaChat.Part]
            if c["chat"] as! Bool {
                parts = try GemmaChat.parts([GemmaChat.Message(role: "user", content: prompt)])
            } else {
                parts = [GemmaChat.Part(control: true, text: GemmaChat.bos), GemmaChat.Part(control: false, text: prompt)]
            }
            XCTAssertEqual(parts, try Vectors.parts(c["parts"]))
            XCTAssertEqual(try ids(parts), try Vectors.ints(c["prompt_ids"]))
        }
    }

    func testSpecialStringsTypedByTheUserAreRefused() throws {
        let typed = try XCTUnwrap(Vectors.cases(chat).first { ($0["name"] as! String).hasPrefix("control strings") })
        let text = try Vectors.messages(typed["messages"])[0].content
        XCTAssertThrowsError(try GemmaChat.checkUserText(text))
        XCTAssertNoThrow(try GemmaChat.checkUserText("an ordinary <b>message</b>"))
    }

    func testTemplateHashIsTheVectorsOne() {
        XCTAssertEqual(chat["template_sha256"] as? String, GemmaChat.templateSHA256)
    }

    func testTextStreamHoldsBackUnfinishedCharacters() {
        // "é" arrives as two byte tokens: after the first the text ends in U+FFFD and is held back.
        let renderings = ["caf", "caf\u{FFFD}", "café", "café!"]
        var stream = TextStream { ids in renderings[ids.count - 1] }
        XCTAssertEqual(stream.push(1), "caf")
        XCTAssertEqual(stream.push(2), "")
        XCTAssertEqual(stream.push(3), "é")
        XCTAssertEqual(stream.push(4), "!")
    }
}
