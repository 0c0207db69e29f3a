import Foundation

/// Sampling settings: temperature 0 is greedy; otherwise the top_k / top_p filtered distribution.
/// Mirrors gemma3_export.generate.Sampling (the shared vectors check the filter, not the draws).
public struct SamplingSettings: Equatable {
    public var temperature: Float
    public var topK: Int
    public var topP: Float
    public var seed: UInt64

    public init(temperature: Float = 0, topK: Int = 64, topP: Float = 0.95, seed: UInt64 = 0) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.seed = seed
    }
}

public enum Sampler {
    /// The first maximum (numpy.argmax).
    public static func greedy(_ logits: [Float]) -> Int {
        var best = 0
        for i in logits.indices where logits[i] > logits[best] { best = i }
        return best
    }

    /// The ids that can be drawn and their probabilities (summing to 1), in id order.
    public static func candidates(_ logits: [Float], _ s: SamplingSettings) -> [(id: Int, probability: Double)] {
        if s.temperature == 0 { return [(id: greedy(logits), probability: 1)] }
        var x = logits.map { Double($0 / s.temperature) }
        if s.topK > 0 {
            let kth = x.sorted(by: >)[min(s.topK, x.count) - 1]
            x = x.map { $0 < kth ? -Double.infinity : $0 }
        }
        let top = x.max()!
        let e = x.map { exp($0 - top) }
        let sum = e.reduce(0, +)
        var p = e.map { $0 / sum }
        if s.topP < 1 {
            var before = 0.0
            for i in p.indices.sorted(by: { p[$0] > p[$1] }) {
                let pi = p[i]
                if before > Double(s.topP) { p[i] = 0 } // keep the smallest set reaching top_p
                before += pi
            }
        }
        let kept = p.indices.filter { p[$0] > 0 }
        let total = kept.reduce(0.0) { $0 + p[$1] }
        return kept.map { (id: $0, probability: p[$0] / total) }
    }
}

/// A seeded generator (SplitMix64): the same seed gives the same draws on every device.
public struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Picks the next token from logits with the given settings.
public final class TokenSampler {
    public let settings: SamplingSettings
    private var rng: SplitMix64

    public init(_ settings: SamplingSettings = SamplingSettings()) {
        self.settings = settings
        rng = SplitMix64(seed: settings.seed)
    }

    public func callAsFunction(_ logits: [Float]) -> Int {
        let c = Sampler.candidates(logits, settings)
        if c.count == 1 { return c[0].id }
        var u = Double.random(in: 0..<1, using: &rng)
        for (id, probability) in c {
            if u < probability { return id }
            u -= probability
        }
        return c[c.count - 1].id
    }
}
