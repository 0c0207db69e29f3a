import Foundation
import GemmaChatCore
import Tokenizers

/// The bundle's tokenizer.json (with tokenizer_config.json) through swift-transformers.
struct HubTokenizer: TextTokenizer {
    let inner: any Tokenizer

    static func load(folder: URL) async throws -> HubTokenizer {
        HubTokenizer(inner: try await AutoTokenizer.from(modelFolder: folder))
    }

    func encode(_ text: String) -> [Int] {
        inner.encode(text: text, addSpecialTokens: false)
    }

    func controlId(_ piece: String) throws -> Int {
        guard let id = inner.convertTokenToId(piece), inner.convertIdToToken(id) == piece else {
            throw BundleError("The bundle's tokenizer has no \(piece) token.")
        }
        return id
    }

    func decode(_ ids: [Int]) -> String {
        inner.decode(tokens: ids, skipSpecialTokens: true)
    }
}
