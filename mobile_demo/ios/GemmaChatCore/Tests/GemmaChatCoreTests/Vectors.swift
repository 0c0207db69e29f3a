import Foundation
import XCTest
@testable import GemmaChatCore

/// The shared test vectors (mobile_demo/shared/test_vectors), written by the Python side.
enum Vectors {
    static let folder: URL = {
        var url = URL(fileURLWithPath: #filePath) // .../mobile_demo/ios/GemmaChatCore/Tests/GemmaChatCoreTests/Vectors.swift
        for _ in 0..<5 { url.deleteLastPathComponent() }
        return url.appendingPathComponent("shared").appendingPathComponent("test_vectors")
    }()

    static func load(_ name: String) throws -> [String: Any] {
        let data = try Data(contentsOf: folder.appendingPathComponent(name))
        return try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    static func cases(_ file: [String: Any], _ key: String = "cases") throws -> [[String: Any]] {
        try XCTUnwrap(file[key] as? [[String: Any]])
    }

    static func ints(_ value: Any?) throws -> [Int] {
        try XCTUnwrap(value as? [Int])
    }

    static func messages(_ value: Any?) throws -> [GemmaChat.Message] {
        try XCTUnwrap(value as? [[String: String]]).map { GemmaChat.Message(role: $0["role"]!, content: $0["content"]!) }
    }

    static func parts(_ value: Any?) throws -> [GemmaChat.Part] {
        try XCTUnwrap(value as? [[String: Any]]).map { GemmaChat.Part(control: $0["control"] as! Bool, text: $0["text"] as! String) }
    }
}

/// A tokenizer that knows exactly the texts the vectors encode: control ids from tokens.json, text ids
/// from the vectors' own parts. It checks prompt assembly, not tokenization.
struct VectorTokenizer: TextTokenizer {
    let controls: [String: Int]
    let texts: [String: [Int]]

    init() throws {
        let pieces = try XCTUnwrap(Vectors.load("tokens.json")["pieces"] as? [String: String])
        controls = Dictionary(uniqueKeysWithValues: pieces.map { ($0.value, Int($0.key)!) })
        var texts: [String: [Int]] = [:]
        let chat = try Vectors.load("chat.json")
        let all = try Vectors.cases(chat) + Vectors.cases(chat, "turns") + Vectors.cases(Vectors.load("greedy.json"))
        for c in all {
            for part in try XCTUnwrap(c["parts"] as? [[String: Any]]) where part["control"] as? Bool == false {
                texts[part["text"] as! String] = try Vectors.ints(part["ids"])
            }
        }
        self.texts = texts
    }

    func encode(_ text: String) -> [Int] {
        guard let ids = texts[text] else { XCTFail("no ids for \(text.debugDescription) in the vectors"); return [] }
        return ids
    }

    func controlId(_ piece: String) throws -> Int {
        guard let id = controls[piece] else { throw BundleError("unknown control piece \(piece)") }
        return id
    }

    func decode(_ ids: [Int]) -> String { ids.map { "·\($0)" }.joined() }
}

/// A model whose logits are scripted: one-hot on the next scripted token at every call.
final class ScriptedModel: LogitsStep {
    var script: [Int]
    private(set) var calls: [(tokens: [Int], position: Int)] = []
    let vocab: Int

    init(_ script: [Int], vocab: Int = 512) {
        self.script = script
        self.vocab = vocab
    }

    func step(tokens: [Int32], position: Int) throws -> [Float] {
        calls.append((tokens: tokens.map { Int($0) }, position: position))
        var logits = [Float](repeating: 0, count: vocab)
        logits[script.removeFirst()] = 1
        return logits
    }

    func resetState() throws {}

    /// Tokens fed one at a time after a prompt of `promptLength` tokens (the decode steps).
    func decoded(after promptLength: Int) -> [Int] {
        calls.filter { $0.position >= promptLength && $0.tokens.count == 1 }.map { $0.tokens[0] }
    }
}
