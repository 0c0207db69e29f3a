import CryptoKit
import Foundation

/// Gemma 3's chat format, the same as gemma3_export.tokenizer.format_chat / encode_chat and the Jinja
/// template bundles carry: `<bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n`.
/// Control tokens are inserted by id; only the text between them is encoded.
public enum GemmaChat {
    public static let bos = "<bos>"
    public static let eos = "<eos>"
    public static let startOfTurn = "<start_of_turn>"
    public static let endOfTurn = "<end_of_turn>"

    /// sha256 of the chat template gemma3-export writes into every manifest (chat.json: template_sha256).
    public static let templateSHA256 = "d2f96210400e38149e26e01918a408c3f2ad3d4bd87c44e8dcf8e1a611a98535"

    /// Strings a Hugging Face tokenizer reads as special tokens wherever they appear in text.
    public static let specialStrings = [bos, eos, startOfTurn, endOfTurn, "<pad>", "<start_of_image>", "<end_of_image>"]

    public struct Message: Equatable {
        public let role: String
        public let content: String
        public init(role: String, content: String) {
            self.role = role
            self.content = content
        }
    }

    /// A run of the prompt: a control token (inserted by id) or text (encoded).
    public struct Part: Equatable {
        public let control: Bool
        public let text: String
        public init(control: Bool, text: String) {
            self.control = control
            self.text = text
        }
    }

    /// Refuse a bundle whose chat template is not the Gemma 3 template implemented here.
    public static func checkTemplate(_ template: String) throws {
        let digest = SHA256.hash(data: Data(template.utf8)).map { String(format: "%02x", $0) }.joined()
        guard digest == templateSHA256 else {
            throw BundleError("This bundle's chat template is not Gemma 3's, and this app formats only Gemma 3 turns.")
        }
    }

    /// The parts of a whole conversation; mirrors gemma3_export.tokenizer._chat_parts.
    public static func parts(_ messages: [Message], addGenerationPrompt: Bool = true) throws -> [Part] {
        guard let head = messages.first else { throw BundleError("The conversation has no messages.") }
        var prefix = ""
        var first = 0
        if head.role == "system" {
            prefix = head.content + "\n\n"
            first = 1
            if messages.count == 1 { throw BundleError("A system message must be followed by a user message.") }
        }
        var out = [Part(control: true, text: bos)]
        for index in first..<messages.count {
            let role = messages[index].role
            let userTurn = (index - first) % 2 == 0
            let ok = userTurn ? role == "user" : (role == "assistant" || role == "model")
            guard ok else {
                throw BundleError("Message \(index) has role '\(role)', but a conversation is an optional system message "
                    + "followed by alternating user and assistant turns starting with user.")
            }
            let text = messages[index].content.trimmingCharacters(in: .whitespacesAndNewlines)
            out.append(Part(control: true, text: startOfTurn))
            out.append(Part(control: false, text: (userTurn ? "user" : "model") + "\n" + (index == first ? prefix : "") + text))
            out.append(Part(control: true, text: endOfTurn))
            out.append(Part(control: false, text: "\n"))
        }
        if addGenerationPrompt {
            out.append(Part(control: true, text: startOfTurn))
            out.append(Part(control: false, text: "model\n"))
        }
        return out
    }

    /// What a cache that already holds the conversation needs before the model answers `userText`:
    /// close the model's turn (its stop token was sampled, not fed), then the user's turn.
    public static func nextTurnParts(_ userText: String) throws -> [Part] {
        let turn = try parts([Message(role: "user", content: userText)]).dropFirst() // no second <bos>
        return [Part(control: true, text: endOfTurn), Part(control: false, text: "\n")] + turn
    }

    public static func render(_ parts: [Part]) -> String {
        parts.map(\.text).joined()
    }

    /// Token ids of `parts`: control tokens by id, text through `encode` (no BOS added).
    public static func assembleIds(_ parts: [Part], controlId: (String) throws -> Int, encode: (String) throws -> [Int]) rethrows -> [Int] {
        var ids: [Int] = []
        for part in parts {
            if part.control {
                ids.append(try controlId(part.text))
            } else {
                ids += try encode(part.text)
            }
        }
        return ids
    }

    /// A Hugging Face tokenizer would read a special string typed by the user as a control token (the
    /// Python reference encodes it as text): refuse such messages instead of diverging silently.
    public static func checkUserText(_ text: String) throws {
        if let found = specialStrings.first(where: { text.contains($0) }) {
            throw BundleError("The message contains \(found), which the tokenizer would read as a control token; remove it.")
        }
    }
}
