import Foundation

/// A bundle or a message the app cannot use; `message` is one sentence for the user.
public struct BundleError: Error, LocalizedError, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var errorDescription: String? { message }
}

/// One input or output of the artifact, as the manifest lists it.
public struct TensorSpec: Decodable, Equatable {
    public let name: String
    public let dtype: String
}

/// The fields of a gemma3-export manifest.json the app reads, checked the way
/// gemma3_export/data/manifest.schema.json and contract.check_manifest check them (the shared vectors
/// in mobile_demo/shared/test_vectors/manifests.json hold the cases). Nothing about a bundle is ever
/// inferred from its file names.
public struct BundleManifest {
    /// The newest manifest format this app reads.
    public static let supportedFormat = 1
    public static let targets = ["onnx", "executorch", "coreml"]

    public let formatVersion: Int
    public let target: String
    public let artifact: String
    public let tokenizer: String
    public let hfTokenizer: [String]
    public let bosId: Int
    public let stopIds: [Int]
    public let maxContext: Int
    public let prefillChunk: Int
    public let prefillChunks: [Int]
    public let chatTemplate: String
    public let vocabSize: Int
    public let inputs: [TensorSpec]
    public let outputs: [TensorSpec]
    /// Core ML only: function name -> tokens per call (`prefill` T = C, `decode` T = 1).
    public let functions: [String: Int]

    private struct Version: Decodable {
        let format_version: Int?
    }

    private struct Fields: Decodable {
        struct Config: Decodable { let vocab_size: Int }
        struct Function: Decodable { let T: Int }
        struct TargetInfo: Decodable { let functions: [String: Function]? }
        let target: String
        let artifact: String
        let tokenizer: String
        let hf_tokenizer: [String]?
        let bos_id: Int
        let stop_ids: [Int]
        let max_context: Int
        let prefill_chunk: Int
        let prefill_chunks: [Int]
        let chat_template: String
        let config: Config
        let inputs: [TensorSpec]
        let outputs: [TensorSpec]
        let target_info: TargetInfo?
    }

    public init(data: Data) throws {
        let decoder = JSONDecoder()
        let version: Version
        do {
            version = try decoder.decode(Version.self, from: data)
        } catch {
            throw BundleError("manifest.json is not a JSON object with an integer format_version.")
        }
        guard let v = version.format_version else { throw BundleError("manifest.json has no integer format_version.") }
        if v > Self.supportedFormat {
            throw BundleError("This bundle is format \(v), newer than the \(Self.supportedFormat) this app reads; update the app.")
        }
        if v < 1 { throw BundleError("manifest.json has an invalid format_version \(v).") }
        let f: Fields
        do {
            f = try decoder.decode(Fields.self, from: data)
        } catch let DecodingError.keyNotFound(key, context) {
            throw BundleError("manifest.json has no \(Self.path(context.codingPath + [key])).")
        } catch let DecodingError.typeMismatch(_, context) {
            throw BundleError("manifest.json's \(Self.path(context.codingPath)) has the wrong type.")
        } catch let DecodingError.valueNotFound(_, context) {
            throw BundleError("manifest.json's \(Self.path(context.codingPath)) is null.")
        } catch let DecodingError.dataCorrupted(context) {
            throw BundleError("manifest.json's \(Self.path(context.codingPath)) is not valid.")
        }
        formatVersion = v
        target = f.target
        artifact = f.artifact
        tokenizer = f.tokenizer
        hfTokenizer = f.hf_tokenizer ?? []
        bosId = f.bos_id
        stopIds = f.stop_ids
        maxContext = f.max_context
        prefillChunk = f.prefill_chunk
        prefillChunks = f.prefill_chunks
        chatTemplate = f.chat_template
        vocabSize = f.config.vocab_size
        inputs = f.inputs
        outputs = f.outputs
        functions = (f.target_info?.functions ?? [:]).mapValues { $0.T }
        try check()
    }

    private func check() throws {
        guard Self.targets.contains(target) else { throw BundleError("manifest.json names an unknown target '\(target)'.") }
        for (name, value) in [("artifact", artifact), ("tokenizer", tokenizer), ("chat_template", chatTemplate)] where value.isEmpty {
            throw BundleError("manifest.json has an empty \(name).")
        }
        guard vocabSize >= 1, maxContext >= 1, prefillChunk >= 1 else {
            throw BundleError("manifest.json's vocab_size, max_context and prefill_chunk must be positive.")
        }
        guard !stopIds.isEmpty else { throw BundleError("manifest.json's stop_ids is empty.") }
        guard Set(stopIds).count == stopIds.count else { throw BundleError("manifest.json repeats a stop id.") }
        guard !prefillChunks.isEmpty, prefillChunks.allSatisfy({ $0 >= 1 }) else {
            throw BundleError("manifest.json's prefill_chunks must be positive and not empty.")
        }
        guard prefillChunks.contains(prefillChunk) else {
            throw BundleError("manifest.json's prefill_chunk \(prefillChunk) is not one of its prefill_chunks \(prefillChunks).")
        }
        guard prefillChunks.max()! <= maxContext else {
            throw BundleError("manifest.json has a prefill chunk larger than its max_context \(maxContext).")
        }
        let special = stopIds + [bosId]
        guard special.allSatisfy({ $0 >= 0 }) else { throw BundleError("manifest.json has a negative token id.") }
        guard !stopIds.contains(bosId) else { throw BundleError("manifest.json's bos_id \(bosId) is also a stop id.") }
        guard special.max()! < vocabSize else {
            throw BundleError("manifest.json has a special token id outside the vocabulary of \(vocabSize).")
        }
    }

    /// Refuse a bundle exported for another runtime.
    public func requireTarget(_ expected: String) throws {
        guard target == expected else {
            throw BundleError("This bundle is for \(target); this app runs \(expected) bundles (export with --target \(expected)).")
        }
    }

    /// Core ML: the tokens per call of the `prefill` and `decode` functions, checked against the
    /// manifest's chunk sizes and the int32 inputs the package takes.
    public func coreMLFunctions() throws -> (prefill: Int, decode: Int) {
        guard let prefill = functions["prefill"], let decode = functions["decode"] else {
            throw BundleError("The manifest names no prefill and decode functions (target_info.functions).")
        }
        guard prefill == prefillChunk, decode == 1, Set(prefillChunks) == Set([prefill, decode]) else {
            throw BundleError("The Core ML functions take T = \(prefill) and \(decode), but the manifest's prefill chunks are \(prefillChunks).")
        }
        guard inputs.map(\.name) == ["tokens", "input_pos"], inputs.allSatisfy({ $0.dtype == "int32" }),
              outputs.first?.name == "logits" else {
            throw BundleError("The Core ML package does not take int32 tokens and input_pos and return logits.")
        }
        return (prefill, decode)
    }

    /// The Hugging Face tokenizer.json the bundle carries (swift-transformers reads it).
    public func requireHFTokenizer() throws {
        guard hfTokenizer.contains(where: { $0.split(separator: "/").last == "tokenizer.json" }) else {
            throw BundleError("This bundle has no tokenizer.json; re-export it with --target coreml.")
        }
    }

    private static func path(_ keys: [CodingKey]) -> String {
        let names = keys.map { key -> String in
            if let index = key.intValue { return "[\(index)]" }
            return key.stringValue
        }
        return names.isEmpty ? "top level" : names.joined(separator: ".")
    }
}
