import Foundation
import GemmaChatCore

/// A loaded Core ML bundle and its conversation. Generation runs on one serial queue; text and the
/// end of a reply are reported on the main actor.
final class ChatEngine {
    struct Summary {
        let tokens: Int
        let tokensPerSecond: Double
        let position: Int
        let maxContext: Int
        let footprintMiB: Double
        let reason: EndReason
    }

    let manifest: BundleManifest
    private let conversation: Conversation
    private let tokenizer: HubTokenizer
    private let queue = DispatchQueue(label: "org.gemma3export.engine")
    private let cancelled = Flag()

    private init(manifest: BundleManifest, conversation: Conversation, tokenizer: HubTokenizer) {
        self.manifest = manifest
        self.conversation = conversation
        self.tokenizer = tokenizer
    }

    /// Check the manifest, compile the package once, load both functions and the tokenizer.
    static func open(bundle: URL) async throws -> ChatEngine {
        let manifest = try BundleStore.manifest(of: bundle)
        let compiled = try await BundleStore.compiledModel(of: bundle, manifest: manifest)
        let tokenizer = try await HubTokenizer.load(folder: bundle)
        for piece in [GemmaChat.bos, GemmaChat.startOfTurn, GemmaChat.endOfTurn] {
            _ = try tokenizer.controlId(piece)
        }
        guard try tokenizer.controlId(GemmaChat.bos) == manifest.bosId else {
            throw BundleError("The bundle's tokenizer.json and manifest disagree on the <bos> id.")
        }
        let stepper = try CoreMLStepper(compiledModel: compiled, manifest: manifest)
        let generator = Generator(model: stepper, maxContext: manifest.maxContext, prefillChunks: manifest.prefillChunks)
        return ChatEngine(manifest: manifest, conversation: Conversation(generator: generator, tokenizer: tokenizer), tokenizer: tokenizer)
    }

    /// Stream the answer to `text`; only the tokens new since the last turn are prefilled.
    func say(_ text: String, settings: SamplingSettings, maxNewTokens: Int,
             onText: @escaping @MainActor (String) -> Void,
             onDone: @escaping @MainActor (Result<Summary, Error>) -> Void) {
        cancelled.set(false)
        queue.async { [self] in
            var stream = TextStream(decode: tokenizer.decode)
            var first: Date?
            var last = Date()
            let result = Result<Summary, Error> {
                let reply = try conversation.say(
                    text, maxNewTokens: maxNewTokens, stopIds: Set(manifest.stopIds), sampler: TokenSampler(settings),
                    shouldStop: { cancelled.isSet },
                    onToken: { id in
                        last = Date()
                        if first == nil { first = last }
                        let piece = stream.push(id)
                        if !piece.isEmpty { DispatchQueue.main.async { MainActor.assumeIsolated { onText(piece) } } }
                    })
                let seconds = first.map { last.timeIntervalSince($0) } ?? 0
                let rate = reply.tokens.count > 1 && seconds > 0 ? Double(reply.tokens.count - 1) / seconds : 0
                return Summary(tokens: reply.tokens.count, tokensPerSecond: rate, position: conversation.generator.position,
                               maxContext: manifest.maxContext, footprintMiB: footprintMiB(), reason: reply.reason)
            }
            DispatchQueue.main.async { MainActor.assumeIsolated { onDone(result) } }
        }
    }

    /// End the current reply after the token being generated.
    func cancel() {
        cancelled.set(true)
    }

    /// Forget the conversation; the next message starts at position 0.
    func reset(onDone: @escaping @MainActor (Error?) -> Void) {
        queue.async { [self] in
            let error: Error?
            do {
                try conversation.reset()
                error = nil
            } catch let e {
                error = e
            }
            DispatchQueue.main.async { MainActor.assumeIsolated { onDone(error) } }
        }
    }
}

/// A thread-safe flag (the UI sets it, the generation loop reads it).
final class Flag {
    private let lock = NSLock()
    private var value = false

    func set(_ newValue: Bool) {
        lock.lock()
        value = newValue
        lock.unlock()
    }

    var isSet: Bool {
        lock.lock()
        defer { lock.unlock() }
        return value
    }
}
